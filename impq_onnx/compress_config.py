"""The options of ``compress`` (:class:`CompressConfig`): one dataclass for the CLI, the YAML config file and the
Python API, with defaults, help texts, choices and validation. :mod:`impq_onnx.compression` runs it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from impq_onnx.config import check_keys, coerce, field_types, read_config, suggest
from impq_onnx.engine.training import BATCHNORM_MODES
from impq_onnx.errors import ConfigError
from impq_onnx.lowering.targets import TARGETS, target_help
from impq_onnx.quant.schemes import SCHEMES
from impq_onnx.quant.schemes import help_text as scheme_help
from impq_onnx.search.iteration import END_STEPS_FACTOR
from impq_onnx.search.methods import METHODS

__all__ = ["CompressConfig", "DERIVED"]

_CHOICES = {
    "method": tuple(METHODS),
    "phases": ("weights-activations", "activations-weights", "weights", "activations"),
    "granularity": ("kernel", "layer", "network"),
    "weight_scheme": SCHEMES,  # the live registry: a registered scheme is a valid option
    "optimizer": ("sgd", "adamw"),
    "batchnorm": BATCHNORM_MODES,
    "weighting": ("paper", "reference", "step", "measured"),
    "sensitivity_method": ("fast", "exact"),
    "act_clip": ("paper", "mse", "learned"),
    "format": TARGETS,  # the live registry: a registered target is a valid option
}
# act_clip's derived default for the methods other than impq (uniform-ptq keeps its percentile floor)
OTHER_METHODS_ACT_CLIP = "paper"
# weight_scheme's derived default for an impq weight phase whose target_bits is below LOW_BIT_TARGET: the step
# fitted to each kernel's RMS (bench/results/candidates.md: 1.74-bit ResNet-20, two seeds); otherwise this one
LOW_BIT_WEIGHT_SCHEME, LOW_BIT_TARGET, WEIGHT_SCHEME = "midrise-rms", 4.0, "midrise-max"


def _act_clip(cfg: CompressConfig) -> str:
    return "mse" if cfg.method == "impq" else OTHER_METHODS_ACT_CLIP


def _weight_scheme(cfg: CompressConfig) -> str:
    return LOW_BIT_WEIGHT_SCHEME if cfg.low_bit_weights() else WEIGHT_SCHEME


# Options whose default is None ("not given") in the work dir's identity and resolved when the run starts
# (CompressConfig.with_derived_defaults): a work dir that ran at the _LEGACY value resumes with it; a new run gets
# this value, or what this function of the config gives (None: derived later, in the run).
DERIVED: dict[str, Any] = {"batchnorm": "frozen", "lr": None, "end_steps_factor": END_STEPS_FACTOR,
                           "act_clip": _act_clip, "weighting": "measured", "weight_scheme": _weight_scheme}


def _opt(default, help_text: str):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass
class CompressConfig:
    """Every option of ``compress`` (CLI ``--name-with-dashes``, YAML and Python ``name_with_underscores``)."""

    model: str | None = _opt(None, "The float ONNX classifier (never modified).")
    data: str | None = _opt(None, "ImageFolder dir (with train/, val/ and test/ subfolders; train/ and test/ "
                                  "or val/ or validation/; or one tree to split) or .npz.")
    method: str = _opt("impq", "Search strategy: impq (the default), faq (uniform bits, power-of-two steps, long "
                               "fine-tune), activation-density (per-layer bits from the fraction of non-zero "
                               "activations) or uniform-ptq (uniform bits, calibration only).")
    output: str | None = _opt(None, "Output model path [default: <model stem>.<method>.onnx in the current folder].")
    report: bool = _opt(True, "Also write <stem>.report.html with the paper's figures for this run.")
    format: str = _opt("qdq", f"Output format: {target_help()}")
    work_dir: str | None = _opt(None, "Checkpoint folder [default: <output stem>.work].")
    resume: bool = _opt(False, "Continue the run in work_dir (same options), or re-emit a finished one.")
    preprocess: str | None = _opt(None, "Preset name or preprocess YAML file [default: inferred from the input shape].")
    classes: str | None = _opt(None, "The model's class order for the class folder names: a comma-separated list "
                                     "or a labels file, one name per line [default: folder names sorted, "
                                     "numerically when all are numbers].")
    input_shape: str | None = _opt(None, "Concrete input shape, e.g. 1,3,224,224, for a model with a dynamic "
                                         "height/width or auto_pad convs [default: the data's: the preprocess "
                                         "size, else the first image's].")
    logits: str | None = _opt(None, "Name of the logits tensor when the model has several outputs and none is "
                                    "clearly the logits (impq-onnx inspect lists them); every output is kept in "
                                    "the written model [default: the single output, the one before a Softmax, or "
                                    "the one a Gemm/MatMul computes].")
    val_fraction: float = _opt(0.2, "Fraction of the training images held out for validation (seeded; of each "
                                     "class, or across classes when classes have too few images; 0: validate "
                                     "on the training images).")
    max_val_samples: int | None = _opt(None, "Use at most this many validation images per evaluation.")
    phases: str = _opt("weights-activations", "Phase order: " + ", ".join(_CHOICES["phases"]) + ".")
    granularity: str = _opt("kernel", "Weight group: kernel, layer or network.")
    weight_scheme: str | None = _opt(None, f"Weight quantizer: {scheme_help()} [default: {LOW_BIT_WEIGHT_SCHEME} "
                                           f"for impq with target_bits below {LOW_BIT_TARGET:g}, else "
                                           f"{WEIGHT_SCHEME}].")
    start_bits: int = _opt(8, "Uniform weight bits at the start of the weight phase.")
    start_act_bits: int = _opt(8, "Uniform activation bits at the start of the activation phase.")
    keep_ends: int = _opt(0, "impq: the first and the last quantized layer keep at least this many bits, their "
                             "kernels' weights and their input activations (set there at a phase start when "
                             "the start bits are fewer, never lowered below; they count in B_w,eff and "
                             "B_a,eff like any group, so the others go lower to reach the targets); 0: no "
                             "floor, the paper's rule (any group can reach 1 bit).")
    act_clip: str | None = _opt(None, "Activation clip per site: mse (whenever a site's bits are set, the clip whose "
                                      "quantization at those bits has the least squared error on the current "
                                      "model's values over 5 training batches) or paper (impq: max over channels "
                                      "of beta + 6|gamma| of the batch-norm before the site, else the 99.9th "
                                      "percentile of the float model's values; uniform-ptq: that percentile) "
                                      "or learned (impq only: mse's clip to start from, then each fine-tune "
                                      "trains the site's step with the weights, LSQ-style, and the plan keeps "
                                      "what it learned) [default: mse for impq, paper for the other methods (faq and "
                                      "activation-density only take paper); work dirs written before the option "
                                      "resume with paper].")
    schedule: str = _opt("50%", "Weight groups lowered per iteration: 400, 50%, 0.5 or 400x3,200,150 (or "
                                "NAME:ARGS of a registered schedule, e.g. fixed:400).")
    act_schedule: str = _opt("50%", "Activation sites lowered per iteration (same forms).")
    target_bits: float | None = _opt(4.0, "End the weight phase at this B_w,eff (none: no target).")
    target_act_bits: float | None = _opt(4.0, "End the activation phase at this B_a,eff (none: no target).")
    land_on_target: bool = _opt(True, "A lowering that would pass target_bits / target_act_bits lowers only as "
                                      "many of its least sensitive groups as reach the target, so the phase ends "
                                      "at the target rather than a whole schedule step below it.")
    target_gbitops: float | None = _opt(None, "Stop the run once C_C <= this many Gbit-OPs per image.")
    max_accuracy_drop: float | None = _opt(None, "Stop when validation top-1 falls more than this many points "
                                                 "below float; keep the last iteration within it.")
    max_iterations: int = _opt(20, "Lowering iterations per phase at most.")
    steps: int = _opt(60, "Fine-tune steps per iteration.")
    epochs: float | None = _opt(None, "Fine-tune epochs per iteration (overrides steps).")
    start_steps: int | None = _opt(None, "Fine-tune steps at a phase start [default: as per iteration].")
    end_steps_factor: float | None = _opt(None, "Fine-tune steps of the lowering that reaches a phase's target "
                                                "(target_bits, target_act_bits), as a multiple of the steps per "
                                                f"iteration [default: {END_STEPS_FACTOR:g}; work dirs written "
                                                "before the option resume with 1].")
    refit_epochs: float = _opt(0.0, "After the search, fine-tune its output plan once more from the input model's "
                                    "float weights for this many epochs (the run's lr, batch size and options, a "
                                    "cosine schedule; checkpointed per part in <work_dir>/refit; a finished run "
                                    "resumed with it runs only the refit) and write that model when it validates "
                                    "at least as well as the search's output (the guard's comparison; report key "
                                    "refit); 0: no refit. ResNet-20 at 1.74 bits: a 7-epoch search, then 30 "
                                    "epochs, ends 0.61 and 0.20 points below float (seeds 0, 1; seed 0 ended "
                                    "0.29 below in bench/polish.py on another CPU; bench/results/candidates.md).")
    refit_average_epochs: int = _opt(0, "With refit_epochs: its last this many epochs run at a constant rate (a "
                                        "fifth of lr; the cosine before them ends there) and the output is the "
                                        "average of the weights after each of their parts (stochastic weight "
                                        "averaging; with batchnorm train, its batch-norm statistics re-estimated "
                                        "on one epoch), when it validates at least as well as the last weights; "
                                        "0: the last weights. "
                                        "ResNet-20 at 1.74 bits, seed 0: 88.32 % against 88.66 % without "
                                        "(bench/results/candidates.md).")
    refit_lr: float | None = _opt(None, "The refit's peak learning rate (its warm-up + cosine starts there) "
                                        "[default: the run's lr].")
    time_budget: float | None = _opt(None, "Stop after the iteration that brings the total wall time past this "
                                           "many seconds.")
    batch_size: int = _opt(32, "Fine-tune batch size.")
    lr: float | None = _opt(None, "Fine-tune learning rate (warm-up, then cosine to 0) [default: impq derives it "
                                  "from the model at its first fine-tune: a short seeded try at 0.005, 0.0015, "
                                  "0.0005 and 0.00015, the best on validation kept; faq and activation-density "
                                  "use 0.005; the rate used is recorded in <stem>.config.yaml].")
    optimizer: str = _opt("sgd", "sgd (momentum) or adamw.")
    momentum: float = _opt(0.9, "SGD momentum.")
    batchnorm: str | None = _opt(None, "Batch-norm while fine-tuning: frozen (the model's running statistics kept "
                                       "and used; scale and shift train) or train (batch statistics, running "
                                       "ones updated) [default: frozen; work dirs written with train, or before "
                                       "the option, resume with train].")
    weight_decay: float = _opt(5e-4, "Weight decay.")
    augment: bool = _opt(False, "Random crop + flip while fine-tuning.")
    distill: bool = _opt(True, "Fine-tune against the input float model's logits (knowledge distillation) even "
                               "when the data has labels (--no-distill: the labels' cross-entropy); data without "
                               "labels always is.")
    guard: bool = _opt(True, "Per iteration, keep the fine-tune only when its validation agreement with the float "
                             "model (top-1 first when max_accuracy_drop reads top-1) is at least that of the same "
                             "plan before it; a diverging fine-tune (non-finite loss) is retried once at lr/10 "
                             "either way.")
    sensitivity_samples: int = _opt(256, "Training images per sensitivity measurement.")
    runner_ups: int = _opt(10, "Runner-up classes in the noise gain.")
    weighting: str | None = _opt(None, "Noise-gain weighting: measured (the mean squared error of the group's "
                                       "quantizer on its own weights or activation values), paper (2^-B), reference "
                                       "(the authors' code) or step (the group's real quantization step squared) "
                                       "[default: measured; a work dir written before it was the default resumes "
                                       "with paper].")
    sensitivity_method: str = _opt("fast", "Noise-gain method: fast or exact.")
    seed: int = _opt(0, "Seed of every random choice (split, data order, probes).")
    threads: int | None = _opt(None, "onnxruntime threads [default: the cores this process may use; the resolved "
                                     "count is recorded in <stem>.config.yaml].")
    replicas: int | None = _opt(None, "Fine-tune data-parallel replicas (SGD only): each batch split over this many "
                                      "sessions of threads/replicas threads; batch-norm then normalises each part "
                                      "with its own statistics, so the count changes the numbers [default: one per "
                                      "thread, each part at least 16 images (2 on 2 cores trains ResNet-20 about 2x "
                                      "as fast as 1); 1 with adamw; recorded in <stem>.config.yaml].")

    @classmethod
    def resolve(cls, config: str | os.PathLike | None = None, **options: Any) -> CompressConfig:
        """Defaults < the YAML ``config`` file < ``options`` (None in ``options`` means "not given")."""
        types = field_types(cls)
        check_keys(options, types, "compress")
        if config is not None and not str(config).strip():
            raise ConfigError("config: the path is empty; give a YAML file of options, or leave it out")
        values = dict(read_config(Path(config), types)) if config is not None else {}
        source = {key: str(config) for key in values}
        values.update({k: v for k, v in options.items() if v is not None})
        source.update({k: "option" for k, v in options.items() if v is not None})
        coerced = {k: coerce(k, v, types[k], source.get(k, "option")) for k, v in values.items()}
        return cls(**coerced).validate()

    def validate(self) -> CompressConfig:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value is None and name in DERIVED:  # not given: resolved when the run starts (resume rules)
                continue
            if value not in choices:
                raise ConfigError(f"option '{name}': {value!r} is not one of {', '.join(choices)}"
                                  f"{suggest(value, choices)}")
        if self.model is None or self.data is None:
            raise ConfigError(f"compress needs {'a model' if self.model is None else 'data'}: give "
                              f"{'MODEL' if self.model is None else '--data DIR'} or set it in the config file")
        from impq_onnx.search.schedule import parse_schedule

        parse_schedule(self.schedule, "schedule")
        parse_schedule(self.act_schedule, "act_schedule")
        from impq_onnx import option_checks

        option_checks.check_numbers(dataclasses.asdict(self), option_checks.COMPRESS)
        option_checks.parse_shape(self.input_shape)
        from impq_onnx.runtime import default_replicas, resolve_threads

        # The machine's defaults become explicit values: they are recorded (config.yaml, the work dir's
        # identity), so a resume or a --config rerun computes with the same ones.
        self.threads = resolve_threads(self.threads)
        if self.replicas is None:
            self.replicas = default_replicas(self.threads, self.batch_size, self.optimizer)
        if self.act_clip == "mse" and self.method not in ("impq", "uniform-ptq"):
            raise ConfigError(f"option 'act_clip': mse works with method impq or uniform-ptq; {self.method} sets "
                              "its own clips (give act_clip: paper, or leave it out)")
        if self.act_clip == "learned" and self.method != "impq":
            raise ConfigError(f"option 'act_clip': learned works with method impq; {self.method} "
                              f"{'does not fine-tune' if self.method == 'uniform-ptq' else 'sets its own clips'} "
                              "(give act_clip: mse or paper, or leave it out)")
        if self.keep_ends and self.method != "impq":
            raise ConfigError(f"option 'keep_ends': works with method impq; {self.method} sets every group's bits "
                              "by its own rule (leave keep_ends at 0)")
        if self.keep_ends and self.granularity == "network":
            raise ConfigError("option 'keep_ends': granularity network has one weight group, the ends included, "
                              "so a floor on the ends is a floor on every weight; use granularity kernel or layer, "
                              "or leave keep_ends at 0")
        if self.refit_epochs and self.method == "uniform-ptq":
            raise ConfigError("option 'refit_epochs': uniform-ptq does not fine-tune; use another method or leave "
                              "refit_epochs at 0")
        if self.refit_lr is not None and not self.refit_epochs:
            raise ConfigError(f"option 'refit_lr': {self.refit_lr:g} needs refit_epochs above 0; give refit_epochs, "
                              "or leave refit_lr out")
        if self.refit_average_epochs and not self.refit_average_epochs < self.refit_epochs:
            raise ConfigError(f"option 'refit_average_epochs': {self.refit_average_epochs} needs refit_epochs above it "
                              f"(now {self.refit_epochs:g}); give refit_epochs, or leave refit_average_epochs at 0")
        if self.replicas > 1 and self.optimizer != "sgd":
            raise ConfigError(f"option 'replicas': {self.replicas} needs optimizer 'sgd', not '{self.optimizer}'")
        return self

    def with_derived_defaults(self) -> CompressConfig:
        """This config with every ``DERIVED`` option still not given set to its current default (``lr`` stays
        None: the run derives it)."""
        given = {name: value(self) if callable(value) else value for name, value in DERIVED.items()
                 if getattr(self, name) is None}
        return dataclasses.replace(self, **{name: value for name, value in given.items() if value is not None})

    def low_bit_weights(self) -> bool:
        """An impq run whose weight phase aims below ``LOW_BIT_TARGET`` bits (weight_scheme's derived default)."""
        return (self.method == "impq" and "weights" in self.phases and self.target_bits is not None
                and self.target_bits < LOW_BIT_TARGET)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "resume"}

    def paths(self) -> dict[str, Path]:
        model = Path(self.model if self.model is not None else "model")  # validate() refuses a missing model
        output = Path(self.output) if self.output else Path(f"{model.stem}.{self.method}.onnx")
        stem = output.with_suffix("") if output.suffix == ".onnx" else output
        return {
            "output": output,
            "plan": Path(f"{stem}.plan.yaml"),
            "report": Path(f"{stem}.report.json"),
            "config": Path(f"{stem}.config.yaml"),
            "report_html": Path(f"{stem}.report.html"),
            "float": Path(f"{stem}.float.onnx"),
            "work_dir": Path(self.work_dir) if self.work_dir else Path(f"{stem}.work"),
        }
