"""The ``impq-onnx`` command: a thin click layer over the library.

Options carry the same names as the library parameters they feed; ``--logits`` names the logits tensor
in every command (``--output`` there is its deprecated alias; in ``compress`` ``--output`` is the model
written). Every command takes ``--json`` (one JSON document on stdout, everything else on stderr); the
long ones (evaluate, sensitivity, verify, compress) take ``--quiet`` and ``--events FILE`` (JSON lines of
:class:`~impq_onnx.events.Event`; ``-``: stdout), shown by :mod:`impq_onnx.cli_progress`.

Exit codes: 0 done; 1 a bug (:class:`~impq_onnx.errors.InternalError`); 2 bad usage or input; 3 a
verification failed (``verify``, or the model ``compress`` lowered); 4 ``compress`` ended without reaching
its targets (outputs written); 5 the environment; 130 / 143 / 129 interrupted by SIGINT / SIGTERM / SIGHUP (the resume
command printed, :mod:`impq_onnx.interrupts`). Errors print one line on stderr; ``-vv`` adds the traceback
of the error and of every exception that caused it.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings

import click

from impq_onnx.cli_options import (
    BUNDLED,
    OneLineGroup,
    dump,
    examples,
    json_option,
    logits_name,
    logits_options,
    parse_shape,
    progress_options,
    reporting,
    user_errors,
    write_stdout,
)
from impq_onnx.lowering.targets import target_help, target_names

__all__ = ["main", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_VERIFY_FAILED", "EXIT_TARGET_NOT_REACHED",
           "EXIT_ENVIRONMENT", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_INTERNAL = 1  # InternalError: a bug
EXIT_USAGE = 2  # UserError and click's usage errors: bad options or input
EXIT_VERIFY_FAILED = 3  # distinct from 2 (bad input): the check ran and found a difference
EXIT_TARGET_NOT_REACHED = 4  # compress wrote its outputs but stopped short of its targets
EXIT_ENVIRONMENT = 5  # PlatformError
EXIT_INTERRUPTED = 130  # SIGINT (143: SIGTERM, 129: SIGHUP); impq_onnx.interrupts prints the resume command


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=examples(f"impq-onnx compress {BUNDLED}/model.onnx --data {BUNDLED} --output out/fm.onnx",
                              "impq-onnx compress --help"))
@click.version_option(package_name="impq-onnx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """impq-onnx: mixed-precision quantization of ONNX image classifiers (IMPQ).

    Exit codes: 0 ok, 1 internal error, 2 usage or bad input, 3 verification failed, 4 target not reached,
    5 environment, 130 / 143 / 129 interrupted by SIGINT / SIGTERM / SIGHUP (a compress run prints its resume
    command).
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # impq-onnx refuses an image over its own pixel limit (data.limits, below Pillow's) in one line naming
    # the file; Pillow's warning for the same header would add two lines of its source to stderr
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")


_CLASSES_HELP = ("The model's class order for the class folder names: a comma-separated list or a labels file, one "
                 "name per line [default: folder names sorted, numerically when all are numbers].")
_SHAPE_HELP = "Concrete input shape for MACs and padding, e.g. 1,3,224,224 [default: the data's]."


@main.command("inspect", epilog=examples(f"impq-onnx inspect {BUNDLED}/model.onnx",
                                          f"impq-onnx inspect {BUNDLED}/model.onnx --input-shape 1,1,28,28 --json"))
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-shape", callback=parse_shape, help="Concrete input shape for MACs, e.g. 1,3,224,224.")
@logits_options
@json_option
@user_errors
def inspect_command(model: str, input_shape, logits: str | None, output_alias: str | None, as_json: bool) -> None:
    """Show the quantizable layers, weight groups and activation sites of MODEL."""
    from impq_onnx.frontend.canonical import load
    from impq_onnx.frontend.inspection import format_json, format_table
    from impq_onnx.frontend.site_analysis import find_sites

    table = find_sites(load(model, output=logits_name(logits, output_alias)), input_shape=input_shape)
    if as_json:
        write_stdout(format_json(table, model) + "\n")
    else:
        click.echo(format_table(table, model))


@main.command("evaluate", epilog=examples(
    f"impq-onnx evaluate {BUNDLED}/model.onnx --data {BUNDLED}",
    f"impq-onnx evaluate out/fm.onnx --data {BUNDLED} --json --quiet"))
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="ImageFolder tree (or one with test/ inside), or .npz.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Evaluate the model simulated under this plan.")
@click.option("--preprocess", help="Preset (imagenet, cifar, fashion-mnist, model-input: arrays fed unchanged) or a YAML file; "
              "default: from the input shape.")
@logits_options
@click.option("--batch-size", default=100, show_default=True)
@click.option("--limit-per-class", type=int, help="Use only the first N images of each class.")
@click.option("--threads", type=int, default=None, help="onnxruntime threads [default: the available cores].")
@json_option
@click.option("--input-shape", callback=parse_shape, help=_SHAPE_HELP)
@click.option("--classes", help=_CLASSES_HELP)
@progress_options
@user_errors
def evaluate_command(model, data, plan_path, preprocess, logits, output_alias, batch_size, limit_per_class, threads,
                     as_json, input_shape, classes, quiet, events):
    """Top-1/top-5 accuracy of MODEL on DATA, agreement with the float model, and throughput."""
    from impq_onnx.option_checks import EVALUATE, check_numbers

    check_numbers(dict(batch_size=batch_size, limit_per_class=limit_per_class, threads=threads), EVALUATE, cli=True)

    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.engine import evaluate
    from impq_onnx.engine.evaluation import nonfinite_initializers
    from impq_onnx.events import Event
    from impq_onnx.frontend.canonical import load
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.frontend.site_analysis import find_sites

    output = logits_name(logits, output_alias)
    with reporting(quiet, events, as_json, (model, data, plan_path, preprocess, classes)) as (progress, out):
        canonical = load(model, output=output)
        for name, count in nonfinite_initializers(canonical)[:1]:
            click.echo(f"impq-onnx: warning: {model}: initializer '{name}' holds {count} NaN/infinite value(s); "
                       "its outputs will not be meaningful", err=True)
        dataset = open_model_data(canonical, data, preprocess, limit_per_class=limit_per_class,
                                  classes=classes, input_shape=input_shape).evaluation
        plan = sites = None
        if plan_path:
            sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
            plan = PrecisionPlan.load_for(plan_path, sites)
        result = evaluate(canonical, dataset.batches(batch_size), plan=plan, sites=sites,
                          float_model=canonical if plan is not None else None, threads=threads, progress=progress,
                          total=len(dataset))
        document = {"model": model, "data": dataset.name, "plan": plan_path, **result.to_dict()}
        progress(Event("done", "evaluate", "", result.n, result.n, document))
    if as_json:
        dump(document)
        return
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    echo = functools.partial(click.echo, file=out)
    echo(f"{model} on {dataset.name} ({result.n} images){' under ' + plan_path if plan_path else ''}")
    agreement = f"agreement with float {pct(result.agreement)}" if result.agreement is not None else ""
    if result.top1 is None:
        echo(f"  no labels in the data: top-1/top-5 not measured{'; ' + agreement if agreement else ''}")
    else:
        echo(f"  top-1 {pct(result.top1)}   top-5 {pct(result.top5)}" + (f"   {agreement}" if agreement else ""))
    from impq_onnx.runtime import resolve_threads

    echo(f"  throughput {result.images_per_second:.0f} images/s ({resolve_threads(threads)} threads, batch {batch_size})")


def _compress_options(func):
    """One ``--option-name`` per :class:`~impq_onnx.compression.CompressConfig` field (the same names)."""
    import dataclasses as _dc

    from impq_onnx.compression import CompressConfig

    for field in reversed([f for f in _dc.fields(CompressConfig) if f.name not in ("model",)]):
        flag = "--" + field.name.replace("_", "-")
        default = "none" if field.default is None else field.default
        help_text = field.metadata.get("help", "")
        if "[default" not in help_text:
            help_text += f" [default: {default}]"
        if field.type in (bool, "bool"):
            func = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=None, help=help_text)(func)
        else:
            func = click.option(flag, field.name, default=None, metavar="VALUE", help=help_text)(func)
    return func


def _check_sensitivity_outputs(outputs, model, data, plan_path, preprocess, classes) -> None:
    """Refuse, before any work, a JSON or CSV output that is one of the command's inputs (the model or its external
    data, the plan, the preprocess, data or classes file) or lies in the data folder."""
    from pathlib import Path

    from impq_onnx.frontend.model_file import model_inputs
    from impq_onnx.outputs import check_paths, input_file

    check_paths([(f"the {p.suffix[1:].upper()} output", p) for p in outputs],
                {**model_inputs(model), "the plan": input_file(plan_path), "the preprocess file": input_file(preprocess),
                 "the data file": input_file(data), "the classes file": input_file(classes)},
                trees={"the data folder": Path(data) if Path(data).is_dir() else None}, flag="-o/--output-prefix")


@main.command("sensitivity", epilog=examples(
    f"impq-onnx sensitivity {BUNDLED}/model.onnx --data {BUNDLED} --samples 256 -o out/fm",
    f"impq-onnx sensitivity {BUNDLED}/model.onnx --data {BUNDLED} --json --events out/fm.events.jsonl"))
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="ImageFolder tree (train/ is used if present), or .npz.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Measure the model simulated under this plan "
              "(its bits give the 2^-B factor).")
@click.option("--samples", default=256, show_default=True, help="Images to average over.")
@click.option("--granularity", type=click.Choice(["kernel", "layer", "network"]), default="kernel", show_default=True)
@click.option("--runner-ups", default=10, show_default=True, help="Runner-up classes S (capped at classes - 1).")
@click.option("--weighting", type=click.Choice(["paper", "reference", "step", "measured"]), default="paper",
              show_default=True, help="paper: 2^-B; reference: the authors' code; step: the real step squared; "
              "measured: the quantizer's mean squared error on the group's own weights or activation values.")
@click.option("--method", type=click.Choice(["fast", "exact"]), default="fast", show_default=True)
@click.option("--preprocess", help="Preset or YAML file; default: from the input shape.")
@click.option("-o", "--output-prefix", type=click.Path(dir_okay=False),
              help="Write <prefix>.json and <prefix>.csv [default: <model stem>.sensitivity].")
@click.option("--top", default=5, show_default=True, help="How many layers to print at each end.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime threads [default: the available cores].")
@click.option("--input-shape", callback=parse_shape, help=_SHAPE_HELP)
@click.option("--logits", metavar="NAME", help="Name of the logits tensor when the model has several outputs.")
@json_option
@click.option("--classes", help=_CLASSES_HELP)
@progress_options
@user_errors
def sensitivity_command(model, data, plan_path, samples, granularity, runner_ups, weighting, method, preprocess,
                        output_prefix, top, seed, threads, input_shape, logits, as_json, classes, quiet, events):
    """Noise-gain sensitivity of every weight group and activation site of MODEL (IMPQ eq. 4-5)."""
    from pathlib import Path

    from impq_onnx.option_checks import SENSITIVITY, check_numbers

    check_numbers(dict(samples=samples, runner_ups=runner_ups, top=top, seed=seed, threads=threads), SENSITIVITY,
                  cli=True)

    import contextlib

    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.events import Event
    from impq_onnx.frontend.canonical import load
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.sensitivity import noise_gain
    from impq_onnx.quant.simulate import simulate
    from impq_onnx.frontend.site_analysis import find_sites

    from impq_onnx.data.prefetch import Prefetch
    from impq_onnx.outputs import OutputSet
    from impq_onnx.runtime import resolve_threads

    with reporting(quiet, events, as_json, (model, data, plan_path, preprocess, classes)) as (progress, out), \
            contextlib.ExitStack() as stack:
        prefix = Path(output_prefix) if output_prefix else Path(Path(model).stem + ".sensitivity")
        json_path, csv_path = Path(f"{prefix}.json"), Path(f"{prefix}.csv")
        _check_sensitivity_outputs([json_path, csv_path], model, data, plan_path, preprocess, classes)
        # staged from the start: a folder that cannot be written is refused before the measurement, not after it
        outputs = stack.enter_context(OutputSet([json_path, csv_path], locked=[json_path]))
        canonical = load(model, output=logits)
        # Only the measured images are decoded (on every core, ahead of the gradients in a prefetch thread); a
        # broken one among them is the same one-line error the up-front check would give.
        dataset = open_model_data(canonical, data, preprocess, classes=classes, input_shape=input_shape,
                                  check=False, workers=resolve_threads(threads)).train_all
        sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
        plan = PrecisionPlan.load_for(plan_path, sites) if plan_path else None
        if samples < len(dataset):  # a seeded, class-blind random subset of exactly `samples` images
            import numpy as np

            dataset = dataset.subset(np.sort(np.random.default_rng(seed).choice(len(dataset), samples,
                                                                                replace=False)))
        measured = simulate(canonical, plan, sites) if plan is not None else canonical
        with Prefetch(dataset.batches(64)) as batches:
            table = noise_gain(measured, sites, batches, plan=plan, granularity=granularity,
                               runner_ups=runner_ups, weighting=weighting, method=method,
                               samples=min(samples, len(dataset)), seed=seed, threads=threads, progress=progress)
        outputs.commit({json_path: table.to_json().encode("utf-8"), csv_path: table.to_csv().encode("utf-8")})
        layer_m: dict[str, float] = {}
        for name, value in table.weights.items():
            layer = name.rpartition("/")[0] if granularity == "kernel" else name
            layer_m[layer] = layer_m.get(layer, 0.0) + value
        ranked = sorted(layer_m.items(), key=lambda kv: (-kv[1], kv[0]))
        acts = [name for name, _ in table.ranked("activations")]
        document = {"model": model, "data": data, "plan": plan_path, "n_samples": table.n_samples,
                    "seconds": table.seconds, "ties": table.ties, "granularity": granularity,
                    "weighting": weighting, "method": method, "outputs": {"json": str(json_path), "csv": str(csv_path)},
                    "layers": [{"name": name, "sensitivity": value} for name, value in ranked],
                    "activations": acts}
        progress(Event("done", "sensitivity", "", table.n_samples, table.n_samples,
                       {k: v for k, v in document.items() if k not in ("layers", "activations")}))
    if as_json:
        dump(document)
        return
    echo = functools.partial(click.echo, file=out)
    echo(f"{model}: noise gain over {table.n_samples} images ({weighting} weighting, {method}, "
         f"{table.seconds:.1f} s, {table.ties} ties skipped)")
    echo("most sensitive layers (sum of kernel M):")
    for name, value in ranked[:top]:
        echo(f"  {value:12.4e}  {name}")
    echo("least sensitive layers:")
    for name, value in ranked[::-1][:top]:
        echo(f"  {value:12.4e}  {name}")
    shown = acts if len(acts) <= 2 * top else acts[:top] + ["..."] + acts[-top:]
    echo(f"activation sites, most to least sensitive: {', '.join(shown)}")
    echo(f"wrote {json_path} and {csv_path}")


@main.command("lower", epilog=examples(
    f"impq-onnx lower {BUNDLED}/model.onnx --plan out/fm.plan.yaml -o out/fm.qdq.onnx",
    f"impq-onnx lower {BUNDLED}/model.onnx --plan out/fm.plan.yaml -o out/fm.qonnx.onnx --format qonnx --json"))
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="Precision plan (YAML/JSON).")
@click.option("-o", "--output-path", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--format", "format_", type=click.Choice(target_names()), default="qdq", show_default=True,
              help=target_help())
@logits_options
@click.option("--input-shape", callback=parse_shape, help=_SHAPE_HELP.replace("the data's", "224 for a dynamic size"))
@click.option("--encodings-version", type=click.Choice(["0.6.1", "1.0.0", "2.0.0"]), default="0.6.1", show_default=True,
              help="AIMET encodings version (--format encodings).")
@click.option("--static-batch", type=click.IntRange(min=1), help="Fix the batch dimension of the model's input and "
              "output to N (QONNX tools need static shapes).")
@json_option
@user_errors
def lower_command(model, plan_path, output_path, format_, logits, output_alias, input_shape, encodings_version,
                  static_batch, as_json):
    """Write MODEL quantized under PLAN (any plan, also a hand-edited one) plus its <out>.bits.json sidecar."""
    from impq_onnx.lowering.lower import lower_file

    paths = lower_file(model, plan_path, output_path, format_, output=logits_name(logits, output_alias),
                       input_shape=input_shape, encodings_version=encodings_version, static_batch=static_batch)
    if as_json:
        dump({"model": model, "plan": plan_path, "format": format_, "outputs": [str(p) for p in paths]})
        return
    for path in paths:
        click.echo(f"wrote {path}")


@main.command("verify", epilog=examples(
    f"impq-onnx verify out/fm.onnx --model out/fm.float.onnx --plan out/fm.plan.yaml --data {BUNDLED}",
    f"impq-onnx verify out/fm.onnx --model out/fm.float.onnx --plan out/fm.plan.yaml --data {BUNDLED} --json"))
@click.argument("lowered", type=click.Path(dir_okay=False))
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="The float model the plan applies to (compress writes it as <stem>.float.onnx).")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Images to compare the outputs on.")
@click.option("--preprocess", help="Preset or YAML file; default: from the input shape.")
@click.option("--limit-per-class", type=int, help="Use only the first N images of each class.")
@click.option("--threads", type=int, default=None, help="onnxruntime threads [default: the available cores].")
@click.option("--logit-tolerance", default=0.0, show_default=True, type=float,
              help="Largest logit difference from the simulation accepted, with the simulation's codes at every "
                   "site (0: exact, as the pinned onnxruntime gives).")
@json_option
@click.option("--input-shape", callback=parse_shape, help=_SHAPE_HELP)
@click.option("--logits", metavar="NAME", help="Name of the float model's logits tensor when it has several outputs.")
@click.option("--classes", help=_CLASSES_HELP)
@progress_options
@user_errors
def verify_command(lowered, model_path, plan_path, data, preprocess, limit_per_class, threads, logit_tolerance,
                   as_json, input_shape, logits, classes, quiet, events):
    """Check LOWERED against MODEL under PLAN: every code, scale and zero point, predictions, ranges, annotations.

    Exits 0 when everything agrees, 3 on any difference (the first of each tensor is printed), 2 on bad input.
    """
    from impq_onnx.option_checks import VERIFY, check_numbers

    check_numbers(dict(limit_per_class=limit_per_class, threads=threads, logit_tolerance=logit_tolerance), VERIFY,
                  cli=True)

    from impq_onnx.cli_progress import counted
    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.events import Event
    from impq_onnx.frontend.canonical import load
    from impq_onnx.lowering.lower import read_lowered
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.lowering.verify import verify

    inputs = (lowered, model_path, plan_path, data, preprocess, classes)
    with reporting(quiet, events, as_json, inputs) as (progress, out):
        canonical = load(model_path, output=logits)
        dataset = open_model_data(canonical, data, preprocess, limit_per_class=limit_per_class,
                                  classes=classes, input_shape=input_shape).evaluation
        sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
        plan = PrecisionPlan.load_for(plan_path, sites)
        result = verify(read_lowered(lowered), canonical, plan, sites,
                        counted(dataset.batches(100), progress, "verify", len(dataset)), threads=threads,
                        logit_tolerance=logit_tolerance)
        document = {"lowered": lowered, "model": model_path, "plan": plan_path, **result.to_dict()}
        progress(Event("done", "verify", "", result.samples, result.samples, document))
    if as_json:
        dump(document)
    else:
        echo = functools.partial(click.echo, file=out)
        echo(f"{lowered}: {'OK' if result.ok else 'FAILED'} over {result.samples} images: "
             f"top-1 agreement with the simulation {100 * result.agreement:.2f} %, "
             f"max logit difference {result.max_logit_diff:.3g}"
             + (f", {result.tie_flips} activation codes one step off at rounding ties" if result.tie_flips else ""))
        if result.deployed_max_logit_diff is not None:
            fused = ", ".join(f"{k} {v}" for k, v in result.fused_kernels.items()) or "no integer kernels"
            echo(f"  as deployed (onnxruntime, every graph optimization; fused: {fused}): top-1 agreement with the "
                 f"integer reference {100 * (result.deployed_agreement or 0):.2f} %, max logit difference "
                 f"{result.deployed_max_logit_diff:.3g}"
                 + ("" if result.deployed_covered else f"; not required to be 0: {result.deployed_note}"))
        for problem in ([result.checker_error] if result.checker_error else []) + result.range_violations \
                + result.record_mismatches:
            echo(f"  {problem}")
    if not result.ok:
        sys.exit(EXIT_VERIFY_FAILED)


@main.command("compress", epilog=examples(
    f"impq-onnx compress {BUNDLED}/model.onnx --data {BUNDLED} --output out/fm.onnx --resume",
    f"impq-onnx compress {BUNDLED}/model.onnx --data {BUNDLED} --output out/fm.onnx --target-bits 3 "
    "--json --events out/fm.events.jsonl > out/fm.result.json"))
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="YAML file of options (keys as below, with _ or -); options given here override it.")
@json_option
@progress_options
@_compress_options
@user_errors
def compress_command(model, config, as_json, quiet, events, **options) -> None:
    """IMPQ mixed-precision search: lower the bits of the least sensitive groups, fine-tune, repeat.

    Writes the model, <stem>.plan.yaml, <stem>.report.json and <stem>.config.yaml; checkpoints go to
    the work dir after every iteration (--resume continues a killed run; an interrupted run prints the
    command). Exits 4 when the run ends without reaching its targets (time budget, accuracy drop,
    max iterations; the outputs are written), 3 when the lowered model fails its verification.
    """
    from impq_onnx.compression import compress

    inputs = (model, config, options.get("data"), options.get("preprocess"), options.get("classes"))
    with reporting(quiet, events, as_json, inputs) as (progress, _):
        result = compress(model, config=config, progress=progress, **options)
    if as_json:
        dump({"model": result.config.model, "data": result.config.data, "method": result.config.method,
               "stop_reason": result.stop_reason, "target_reached": result.target_reached,
               "iterations": len(result.iterations), "final": result.final, "reference": result.reference,
               "paths": {key: str(path) for key, path in result.paths.items()},
               "exit_code": EXIT_OK if result.target_reached else EXIT_TARGET_NOT_REACHED})
    if not result.target_reached:
        cfg, final = result.config, result.final
        phases = cfg.phases.split("-")  # a target of a phase the run does not have is not one of its goals
        goals = [f"{name} {value:.3f} (target {target:g})" for name, value, target, used in (
            ("B_w,eff", final.get("weight_bits_effective"), cfg.target_bits, "weights" in phases),
            ("B_a,eff", final.get("activation_bits_effective"), cfg.target_act_bits, "activations" in phases),
            ("Gbit-OPs", final.get("gbitops"), cfg.target_gbitops, True))
            if used and target is not None and value is not None]
        click.echo(f"impq-onnx: target not reached: the run stopped at {result.stop_reason} with "
                   f"{', '.join(goals) or 'its targets unmet'}; the outputs are written ({result.paths['output']})",
                   err=True)
        sys.exit(EXIT_TARGET_NOT_REACHED)


@main.command("report", epilog=examples("impq-onnx report out/fm.work -o out/fm.report.html",
                                         "impq-onnx report out/kernel.work out/layer.work -o out/compare.html --json"))
@click.argument("work_dirs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output-html", required=True, type=click.Path(dir_okay=False),
              help="The HTML file to write; the PNG figures go beside it as <stem>.<figure>.png.")
@json_option
@user_errors
def report_command(work_dirs, output_html, as_json) -> None:
    """HTML report (bits per layer, accuracy vs bits, sensitivity, summary) of the compress runs in WORK_DIRS.

    Several work dirs (e.g. one run per granularity) add the compression-ratio vs accuracy comparison.
    """
    from impq_onnx.report import write_report

    paths = write_report(list(work_dirs), output_html)
    if as_json:
        dump({"work_dirs": list(work_dirs), "outputs": [str(p) for p in paths]})
        return
    for path in paths:
        click.echo(f"wrote {path}")


@main.command("demo", epilog=examples("impq-onnx demo --output fashion-demo", "impq-onnx demo --quick --output /tmp/demo"))
@click.option("--output", "output_dir", default="impq-demo", show_default=True, type=click.Path(file_okay=False),
              help="A fresh folder for the outputs (absent or empty).")
@click.option("--quick", is_flag=True, help="A short run (few fine-tune steps, low targets reached sooner).")
@user_errors
def demo_command(output_dir: str, quick: bool) -> None:
    """Compress the bundled Fashion-MNIST model on its bundled images (both ship with the package) into DIR."""
    from pathlib import Path
    from typing import Any

    import impq_onnx
    from impq_onnx.compression import compress
    from impq_onnx.errors import ConfigError

    data = Path(impq_onnx.__file__).parent / "demo_data"
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: not a folder; the demo writes into a fresh folder, give another --output")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: the demo writes into a fresh folder and this one is not empty; give another "
                          "--output")
    quick_options: dict[str, Any] = dict(steps=10, start_steps=20, sensitivity_samples=64, max_val_samples=100, target_bits=5.0,
                         target_act_bits=6.0) if quick else {}
    result = compress(str(data / "model.onnx"), str(data), output=str(out / "fashion-mnist.impq.onnx"),
                      progress=True, **quick_options)
    click.echo(f"wrote {', '.join(str(p) for k, p in sorted(result.paths.items()) if p.exists())}")
