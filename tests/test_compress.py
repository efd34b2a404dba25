"""compress: the IMPQ loop end to end on the bundled Fashion-MNIST data, its options and config files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from impq_onnx.compression import CompressConfig, compress
from impq_onnx.data import PRESETS, open_dataset
from impq_onnx.errors import ConfigError, DataError
from impq_onnx.frontend.canonical import load
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.frontend.site_analysis import find_sites

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fashion-mnist" / "model.onnx"
DATA = ROOT / "models" / "fashion-mnist"
needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="the bundled Fashion-MNIST model is not built yet")
TINY = dict(steps=3, start_steps=6, sensitivity_samples=32, max_val_samples=40, batch_size=16, max_iterations=3,
            target_bits=None, target_act_bits=None)


@needs_model
def test_weights_then_activations_end_to_end(tmp_path):
    before = MODEL.read_bytes()
    result = compress(MODEL, DATA, output=tmp_path / "out.onnx", progress=False, **TINY)
    assert MODEL.read_bytes() == before  # the input model is never modified
    paths = result.paths
    for key in ("output", "plan", "report", "config"):
        assert paths[key].is_file(), key
    assert not list(tmp_path.glob(".*.tmp"))

    records = json.loads(paths["report"].read_text())["iterations"]
    assert [(r["phase"], r["kind"]) for r in records] == [("weights", "start")] + [("weights", "lower")] * 3 + [
        ("activations", "start")] + [("activations", "lower")] * 3
    bits = [r["weight_bits_effective"] for r in records]
    assert bits[0] == 8.0 and all(b <= a for a, b in zip(bits, bits[1:]))
    assert all(b < a for a, b in zip(bits[:4], bits[1:4]))  # every weight step lowers B_w,eff
    act_bits = [r["activation_bits_effective"] for r in records]
    assert act_bits[:4] == [32.0] * 4 and act_bits[4] == 8.0 and act_bits[-1] < 8.0
    for r in records:
        assert r["compression_ratio"] == pytest.approx(16.0 / r["weight_bits_effective"])
        assert 0.0 <= r["val_top1"] <= 1.0 and 0.0 <= r["val_agreement"] <= 1.0

    # The report's final metrics are those of the written plan.
    canonical = load(MODEL)
    sites = find_sites(canonical, (1, 1, 28, 28))
    plan = PrecisionPlan.load(paths["plan"])
    summary = plan.summary(sites)
    report = json.loads(paths["report"].read_text())
    for key, value in summary.items():
        assert report["final"][key] == pytest.approx(value)
    assert report["stop_reason"] == "max_iterations" and report["final"]["iteration"] == 7
    assert result.final == report["final"]

    # The simulated output model runs in onnxruntime and reproduces the reported test accuracy.
    session = ort.InferenceSession(paths["output"].read_bytes(), providers=["CPUExecutionProvider"])
    test = open_dataset(DATA / "test", PRESETS["fashion-mnist"])
    hits = 0
    for x, y in test.batches(50):
        logits = session.run(None, {session.get_inputs()[0].name: x})[0]
        assert logits.shape == (len(x), 10) and np.isfinite(logits).all()
        hits += int((logits.argmax(1) == y).sum())
    assert hits / len(test) == pytest.approx(report["final"]["test_top1"])

    # The resolved config reproduces the run's options.
    resolved = yaml.safe_load(paths["config"].read_text())
    assert CompressConfig.resolve(paths["config"]).to_dict() == result.config.to_dict() == resolved


@needs_model
def test_one_tree_is_split_and_activations_only(tmp_path):
    result = compress(MODEL, DATA / "train", output=tmp_path / "m.onnx", progress=False, phases="activations",
                      **dict(TINY, max_iterations=1, granularity="layer"))
    assert [r.kind for r in result.iterations] == ["start", "lower"]
    assert "test_top1" not in result.final and result.final["weight_bits_effective"] == 32.0
    assert result.iterations[0].val_n == 40


def test_config_file_unknown_key_suggests_the_nearest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m.onnx\ndata: d\ntarget-bit: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'target_bit' \(did you mean 'target_bits'\?\)"):
        CompressConfig.resolve(path)


def test_api_unknown_option_suggests_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'max_accuracy_drop'"):
        compress("m.onnx", "d", max_acuracy_drop=1.0)


def test_options_override_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m.onnx\ndata: d\nsteps: 7\nschedule: 400x3,200,150\ntarget_bits: null\n")
    cfg = CompressConfig.resolve(path, steps="9")
    assert (cfg.steps, cfg.schedule, cfg.target_bits, cfg.lr) == (9, "400x3,200,150", None, None)  # lr: derived


@pytest.mark.parametrize("options, message", [
    (dict(steps="many"), "option 'steps': 'many' is not an integer"),
    (dict(granularity="kernal"), "did you mean 'kernel'"),
    (dict(phases="weights-only"), "is not one of"),
    (dict(schedule="150%"), "schedule"),
    (dict(start_bits=0), "within 1..16"),
    (dict(val_fraction=1.5), "at least 0 and below 1"),
    (dict(target_bits="none", lr=-1), "'lr'"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=message) as info:
        CompressConfig.resolve(model="m.onnx", data="d", **options)
    assert "\n" not in str(info.value)


def test_cli_bad_option_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "impq_onnx", "compress", "m.onnx", "--data", "d",
                             "--granularity", "kernal"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "impq-onnx: error: option 'granularity': 'kernal' is not one of kernel, layer, network "
        "(did you mean 'kernel'?)"]


def test_cli_missing_model_file_leaves_no_output(tmp_path):
    result = subprocess.run([sys.executable, "-m", "impq_onnx", "compress", "nope.onnx", "--data", str(DATA)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@needs_model
def test_default_settings_on_the_bundled_data(tmp_path):
    result = compress(MODEL, DATA, output=tmp_path / "out.onnx", progress=False)
    assert result.stop_reason == "target_act_bits"
    assert result.final["weight_bits_effective"] <= 4.0 and result.final["activation_bits_effective"] <= 4.0
    assert result.final["elapsed"] < 300


@needs_model
def test_unlabelled_images_distill_and_watch_agreement(tmp_path):
    import shutil

    flat = tmp_path / "flat"
    flat.mkdir()
    for folder in sorted((DATA / "train").iterdir()):
        for image in sorted(folder.glob("*.png"))[:6]:
            shutil.copy(image, flat / f"{folder.name}-{image.name}")
    result = compress(MODEL, flat, output=tmp_path / "m.onnx", progress=False, phases="weights", max_accuracy_drop=50,
                      **dict(TINY, max_iterations=1))
    assert result.reference["top1"] is None and result.final["val_top1"] is None
    assert 0.0 <= result.final["val_agreement"] <= 1.0
    assert all(r.within_accuracy_drop for r in result.iterations)


def test_train_val_test_folders_are_used_as_they_are(tmp_path):
    """With train/, val/ and test/ the validation split is val/ (unseen by the float model), not a part of train/."""
    from impq_onnx.data.model_data import open_model_data

    root = tmp_path / "three"
    for split, count in (("train", 5), ("val", 3), ("test", 2)):
        for folder in sorted((DATA / "train").iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.glob("*.png"))[:count]:
                (root / split / folder.name / image.name).symlink_to(image)
    model = load(MODEL)

    def sizes():
        data = open_model_data(model, root, "fashion-mnist")
        return len(data.train), len(data.val), None if data.test is None else len(data.test)

    assert sizes() == (50, 30, 20)
    (root / "val").rename(root / "other")  # train/ + test/: validation is held out of train/ (one per class)
    assert sizes() == (40, 10, 20)
    (root / "test").rename(root / "validation")  # the name `evaluate` also takes for the held-out folder
    assert sizes() == (40, 10, 20)
    (root / "validation").rename(root / "elsewhere")  # one tree: train/, other/ and elsewhere/ are its classes
    with pytest.raises(DataError, match=f"^{root}: 3 class folders, but {MODEL} has 10 outputs"):
        sizes()


def test_a_class_count_mismatch_is_one_line_before_any_work(tmp_path):
    """compress checks the data against the model first: a one-line error naming both, exit 2, no work dir."""
    data = tmp_path / "three-classes"
    for folder in sorted((DATA / "train").iterdir())[:3]:
        (data / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.png"))[:4]:
            (data / folder.name / image.name).symlink_to(image)
    result = subprocess.run([sys.executable, "-m", "impq_onnx", "compress", str(MODEL), "--data", str(data),
                             "--output", str(tmp_path / "m.onnx"), "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"impq-onnx: error: {data}: 3 class folders, but {MODEL} has 10 outputs; "
                                          "point --data at a folder with one subfolder per model class"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["three-classes"]  # no work dir, no output


@needs_model
def test_replicas_train_in_parallel_and_need_sgd(tmp_path):
    result = compress(MODEL, DATA, output=tmp_path / "r.onnx", progress=False, phases="weights", replicas=2,
                      **dict(TINY, max_iterations=1))
    assert result.config.replicas == 2 and result.iterations[-1].fine_tune_steps == TINY["steps"]
    assert yaml.safe_load(result.paths["config"].read_text())["replicas"] == 2
    # train/ and test/ decoded once each, in the work dir (never in the data folder)
    assert len(list((result.paths["work_dir"] / "decoded").glob("decoded-*.npy"))) == 2
    assert not list(DATA.rglob("*.npy"))
    with pytest.raises(ConfigError, match="'replicas': 2 needs optimizer 'sgd'"):
        CompressConfig.resolve(model=str(MODEL), data=str(DATA), replicas=2, optimizer="adamw")


def test_threads_and_replicas_default_to_the_machine_and_are_recorded():
    from impq_onnx.runtime import available_cores, default_replicas

    cores = available_cores()
    cfg = CompressConfig.resolve(model=str(MODEL), data=str(DATA))
    assert cfg.threads == cores and cfg.replicas == default_replicas(cores, 32)
    # concrete values in what config.yaml and the work dir's identity are made of
    assert cfg.to_dict()["threads"] == cores and cfg.to_dict()["replicas"] == cfg.replicas
    assert CompressConfig.resolve(model=str(MODEL), data=str(DATA), threads=4, batch_size=32).replicas == 2
    assert CompressConfig.resolve(model=str(MODEL), data=str(DATA), threads=4, batch_size=16).replicas == 1
    assert CompressConfig.resolve(model=str(MODEL), data=str(DATA), threads=4, optimizer="adamw").replicas == 1
    assert CompressConfig.resolve(model=str(MODEL), data=str(DATA), threads=4, replicas=3).replicas == 3


@needs_model
def test_distill_fine_tunes_against_the_input_float_model(tmp_path, monkeypatch):
    """distill: every fine-tune of the run matches the logits of the input float model (not of the
    drifting fine-tuned shadow weights), labels or not. The spy wraps the real fine-tune."""
    from impq_onnx.search import iteration

    seen, real = [], iteration.fine_tune

    def spy(model, plan, sites, batches, **kwargs):
        seen.append((model, kwargs["distill"], kwargs["teacher"]))
        return real(model, plan, sites, batches, **kwargs)

    monkeypatch.setattr(iteration, "fine_tune", spy)
    result = compress(MODEL, DATA, output=tmp_path / "d.onnx", progress=False, phases="weights",
                      **dict(TINY, max_iterations=1))
    # the learning-rate probe's tries (no --lr) first, then the two iterations' fine-tunes
    assert len(seen) == len(iteration.LR_PROBE_RATES) + 2 and all(distill is True for _, distill, _ in seen)
    (first, _, teacher), (later, _, teacher2) = seen[-2:]
    assert teacher is teacher2 and first is teacher and later is not teacher  # later: the fine-tuned weights
    assert all(model is first and t is teacher for model, _, t in seen[:-2])
    assert all(np.isfinite(r.fine_tune_loss) for r in result.iterations)
    assert yaml.safe_load(result.paths["config"].read_text())["distill"] is True
    seen.clear()  # distillation is the default, labels or not; --no-distill: the labels' cross-entropy
    compress(MODEL, DATA, output=tmp_path / "t.onnx", progress=False, phases="weights", lr=0.005,
             **dict(TINY, max_iterations=0))
    compress(MODEL, DATA, output=tmp_path / "l.onnx", progress=False, phases="weights", distill=False, lr=0.005,
             **dict(TINY, max_iterations=0))
    assert [distill for _, distill, _ in seen] == [True, None]


@needs_model
def test_the_lowering_that_lands_on_the_target_fine_tunes_longer(tmp_path):
    """end_steps_factor: the fine-tune of the lowering that reaches the phase's target (the plan the phase ends
    with) runs that many times the steps per iteration; a lowering that stays above it runs ``steps``."""
    options = dict(TINY, max_iterations=1, start_bits=4, start_steps=2)
    landed = compress(MODEL, DATA, output=tmp_path / "a.onnx", progress=False, phases="weights",
                      end_steps_factor=2.5, **dict(options, target_bits=3.5))
    assert landed.stop_reason == "target_bits"
    assert [r.fine_tune_steps for r in landed.iterations] == [2, 8]  # start_steps, then ceil(2.5 * 3)
    above = compress(MODEL, DATA, output=tmp_path / "b.onnx", progress=False, phases="weights",
                     **dict(options, target_bits=3.0))
    assert above.stop_reason == "max_iterations" and above.iterations[-1].weight_bits_effective > 3.0
    assert [r.fine_tune_steps for r in above.iterations] == [2, 3]
    assert above.config.end_steps_factor == 4.0  # not given: the default, recorded in config.yaml
    config = yaml.safe_load(above.paths["config"].read_text())
    assert config["end_steps_factor"] == 4.0
    # a weight target below 4 bits, scheme not given: the RMS-fitted step, in the config, the plan and the model
    assert config["weight_scheme"] == "midrise-rms"
    assert yaml.safe_load(above.paths["plan"].read_text())["weight_scheme"] == "midrise-rms"
    assert json.loads(above.paths["report"].read_text())["config"]["weight_scheme"] == "midrise-rms"


@needs_model
def test_step_weighting_ranks_the_lowering(tmp_path):
    """--weighting step (the real quantization step², as `impq-onnx sensitivity` has it) drives the loop."""
    result = compress(MODEL, DATA, output=tmp_path / "s.onnx", progress=False, phases="weights", weighting="step",
                      **dict(TINY, max_iterations=1, start_bits=4, target_bits=3.5))
    assert result.config.weighting == "step" and result.iterations[-1].lowered > 0
    assert 3.4 < result.final["weight_bits_effective"] <= 3.5
    sensitivity = json.loads((tmp_path / "s.work" / "iterations" / "0001" / "sensitivity.json").read_text())
    assert sensitivity["weighting"] == "step"


@needs_model
def test_measured_weighting_ranks_the_activation_lowering(tmp_path):
    """--weighting measured drives the activation phase: the sites lowered are the least sensitive by the
    measured M that the iteration's sensitivity.json records."""
    result = compress(MODEL, DATA, output=tmp_path / "m.onnx", progress=False, phases="activations",
                      weighting="measured", **dict(TINY, max_iterations=1, start_act_bits=6, target_act_bits=5.5,
                                                   land_on_target=False, act_schedule="2"))
    assert result.config.weighting == "measured" and result.iterations[-1].lowered == 2
    sensitivity = json.loads((tmp_path / "m.work" / "iterations" / "0001" / "sensitivity.json").read_text())
    assert sensitivity["weighting"] == "measured"
    scores = sensitivity["activations"]
    plan = yaml.safe_load((tmp_path / "m.plan.yaml").read_text())["activations"]
    lowered = sorted(name for name, bits in plan.items() if bits == 5)
    assert lowered == sorted(sorted(scores, key=lambda name: scores[name])[:2])


@needs_model
def test_a_fresh_run_evaluates_the_float_model_on_validation_once(tmp_path, monkeypatch):
    """The float model's validation classes come from its reference evaluation; every agreement figure of the
    search compares with them."""
    from impq_onnx.search import iteration

    calls = []
    real = iteration.predicted_classes
    monkeypatch.setattr(iteration, "predicted_classes", lambda *a, **k: calls.append(1) or real(*a, **k))
    options = dict(TINY, max_iterations=1, lr=0.005)
    fresh = compress(MODEL, DATA, output=tmp_path / "f.onnx", progress=False, phases="weights", **options)
    assert calls == [] and len(fresh.iterations) == 2
    assert all(r.val_agreement is not None for r in fresh.iterations)


@needs_model
def test_keep_ends_holds_the_first_and_last_layers_through_a_real_run(tmp_path):
    """--keep-ends 8 on the real engine: the written plan keeps conv1's and fc's kernels and their input sites at 8
    bits while the lowering takes the other groups below the start, and the lowered model verifies against it."""
    import impq_onnx

    result = compress(MODEL, DATA, output=tmp_path / "k.onnx", progress=False, keep_ends=8,
                      **dict(TINY, max_iterations=1, start_bits=4, start_act_bits=6))
    plan = PrecisionPlan.load(result.paths["plan"])
    assert plan.weights["conv1"] == [8] * 16 and plan.weights["fc"] == [8] * 10
    assert plan.activations["input"] == 8 and plan.activations["flatten.out"] == 8
    assert min(plan.weights["conv2"] + plan.weights["conv3"] + plan.weights["conv4"]) == 3
    assert min(plan.activations[t] for t in ("relu1.out", "relu2.out", "relu3.out")) == 5
    check = impq_onnx.verify(result.paths["output"], tmp_path / "k.float.onnx", result.paths["plan"], DATA / "test")
    assert check.ok, check.to_dict()
