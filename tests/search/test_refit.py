"""compress --refit-epochs: the search's output plan fine-tuned again from the float weights, checkpointed in parts
(impq_onnx.search.refit), on the bundled Fashion-MNIST model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from impq_onnx.compression import compress
from impq_onnx.errors import ConfigError
from impq_onnx.frontend.canonical import load
from impq_onnx.search import refit as refit_module

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "fashion-mnist" / "model.onnx"
DATA = ROOT / "models" / "fashion-mnist"
pytestmark = pytest.mark.skipif(not MODEL.is_file(), reason="the bundled Fashion-MNIST model is not built yet")
# One lowering of the weight phase; 480 training images at batch 16 are 30 steps an epoch: a 2-epoch refit is
# 60 steps, in 2 parts of one epoch with PART_MIN_STEPS at 1.
OPTIONS = dict(steps=3, start_steps=6, sensitivity_samples=32, max_val_samples=40, batch_size=16, max_iterations=1,
               target_bits=None, phases="weights", seed=2, lr=0.005, guard=False, report=False, progress=False)


class Interrupted(Exception):
    pass


def _run(folder: Path, **options):
    return compress(MODEL, DATA, output=folder / "out.onnx", **dict(OPTIONS, **options))


def _outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("out.onnx", "out.float.onnx", "out.plan.yaml")}


def _report(folder: Path) -> dict:
    return json.loads((folder / "out.report.json").read_text())


def _strip(refit: dict) -> list:
    """The refit block's items in their order, less its wall time."""
    return [(k, v) for k, v in refit.items() if k != "seconds"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run with a 2-epoch refit in 2 parts, and the same run without the refit (guard off: the
    refit is the output)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(refit_module, "PART_MIN_STEPS", 1)
    try:
        refitted, plain = tmp_path_factory.mktemp("refit"), tmp_path_factory.mktemp("plain")
        _run(refitted, refit_epochs=2)
        _run(plain)
    finally:
        patch.undo()
    return refitted, plain


def test_the_refit_starts_from_float_on_the_search_plan_and_is_reported(whole):
    refitted, plain = whole
    report, search = _report(refitted), _report(plain)
    block = report["refit"]
    assert search["refit"] is None
    assert block["from_iteration"] == 1 and block["steps"] == 60 and block["epochs"] == 2.0 and block["lr"] == 0.005
    # the search is the same run: same records, same plan; the output's weights are the refit's
    assert (refitted / "out.plan.yaml").read_bytes() == (plain / "out.plan.yaml").read_bytes()
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k and k != "elapsed"} for r in rs]  # noqa: E731
    assert strip(report["iterations"]) == strip(search["iterations"])
    assert block["search_val_agreement"] == search["final"]["val_agreement"]
    progress = json.loads((refitted / "out.work" / "refit" / "refit.json").read_text())
    assert progress["done"] == 60 and len(progress["losses"]) == 2  # two committed parts
    # the last part's files only: each commit removes the part before
    assert sorted(p.name for p in (refitted / "out.work" / "refit").iterdir()) == [
        "refit.json", "velocity-60.npz", "weights-60.npz"]
    assert block["kept"] and report["final"]["val_agreement"] == block["val_agreement"]
    # from float: every quantized weight moved from the input model's, and not to where the search left it
    from onnx import numpy_helper

    def weights(path: Path) -> dict[str, np.ndarray]:
        return {t.name: numpy_helper.to_array(t) for t in load(path).to_proto().graph.initializer}

    tuned, search_tuned, base = weights(refitted / "out.float.onnx"), weights(plain / "out.float.onnx"), weights(MODEL)
    for name in ("conv1.weight", "conv4.weight", "fc.weight"):
        assert not np.array_equal(tuned[name], base[name]) and not np.array_equal(tuned[name], search_tuned[name])


def test_the_report_page_says_what_the_refit_did(whole):
    from impq_onnx.report import read_run
    from impq_onnx.report.html import summary_rows

    refitted, plain = whole
    rows = dict(r for r in summary_rows(read_run(refitted / "out.work")) if r is not None)
    assert rows["refit"].startswith("2 epochs from float on iteration 1's plan") and rows["refit"].endswith(", written")
    assert f"vs the search's {100 * _report(refitted)['refit']['search_val_agreement']:.2f} %" in rows["refit"]
    assert "refit" not in dict(r for r in summary_rows(read_run(plain / "out.work")) if r is not None)


def test_a_refit_in_parts_writes_what_a_refit_in_one_part_does(tmp_path, whole):
    """PART_MIN_STEPS (200) above the refit's 60 steps: one fine-tune call; the fixture's ran two."""
    _run(tmp_path, refit_epochs=2)
    assert len(json.loads((tmp_path / "out.work" / "refit" / "refit.json").read_text())["losses"]) == 1
    assert _outputs(tmp_path) == _outputs(whole[0])


def test_a_refit_that_validates_below_the_search_is_not_written(tmp_path):
    """With the guard on, this run's refit agrees with float on 97.5 % of the validation images and the search's
    output on 100 %: the search's output is written, as without the refit."""
    _run(tmp_path / "plain", guard=True)
    _run(tmp_path / "refit", guard=True, refit_epochs=2)
    block = _report(tmp_path / "refit")["refit"]
    assert not block["kept"] and block["val_agreement"] < block["search_val_agreement"]
    assert _outputs(tmp_path / "refit") == _outputs(tmp_path / "plain")
    from impq_onnx.report import read_run
    from impq_onnx.report.html import summary_rows

    rows = dict(r for r in summary_rows(read_run(tmp_path / "refit" / "out.work")) if r is not None)
    assert rows["refit"].endswith("not kept, the search's model is written")


def test_an_interrupted_refit_resumes_to_the_uninterrupted_bytes(tmp_path, whole, monkeypatch):
    refitted, _ = whole
    monkeypatch.setattr(refit_module, "PART_MIN_STEPS", 1)

    def stop_after_the_first_part(event):
        if event.phase == "refit" and str(event).startswith("refit: step 30/60"):
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(tmp_path, refit_epochs=2, progress=stop_after_the_first_part)
    assert not (tmp_path / "out.onnx").exists()
    first = json.loads((tmp_path / "out.work" / "refit" / "refit.json").read_text())
    assert first["done"] == 30
    # killed after the next part's weights were written but before refit.json named them: ignored, then replaced
    (tmp_path / "out.work" / "refit" / "weights-60.npz").write_bytes(b"the next part, never committed")
    events = []
    _run(tmp_path, refit_epochs=2, resume=True, progress=events.append)
    assert any("resuming after step 30" in str(e) for e in events)
    assert not any("step 30/60" in str(e) for e in events if e.phase == "refit")  # the first part is not run again
    # the last part's line: the time of both parts (the first's from refit.json), and no time left to estimate
    (last,) = [e for e in events if e.phase == "refit" and str(e).startswith("refit: step 60/60")]
    assert last.data["seconds"] > first["seconds"] > 0 and last.data["seconds_left"] == 0
    assert str(last).endswith(" min")
    assert _outputs(tmp_path) == _outputs(refitted)
    assert _strip(_report(tmp_path)["refit"]) == _strip(_report(refitted)["refit"])  # in the same order


def test_a_finished_run_resumed_with_a_refit_runs_only_the_refit(tmp_path, whole, monkeypatch):
    refitted, _ = whole
    monkeypatch.setattr(refit_module, "PART_MIN_STEPS", 1)
    _run(tmp_path)
    events = []
    _run(tmp_path, refit_epochs=2, resume=True, progress=events.append)
    assert not any(e.kind == "iteration" for e in events)  # no search iteration ran again
    assert _outputs(tmp_path) == _outputs(refitted)
    computed = _report(tmp_path)["refit"]
    events = []
    _run(tmp_path, refit_epochs=2, resume=True, progress=events.append)  # finished: nothing trains
    assert any(str(e).endswith("at lr 0.005, finished: its result is read back") for e in events)
    assert not any(e.phase == "fine-tune" for e in events) and _outputs(tmp_path) == _outputs(refitted)
    # the block read back from refit.json (its keys sorted there) is the one computed, in the same order
    assert list(_report(tmp_path)["refit"].items()) == list(computed.items())
    # a refit folder of other settings is refused, not overwritten
    with pytest.raises(ConfigError, match=r"refit.* holds a refit with epochs 2.0, not 3.0: .*remove"):
        _run(tmp_path, refit_epochs=3, resume=True)
    # refit_epochs 0 writes the search's output again (the refit folder is left alone)
    _run(tmp_path, resume=True)
    assert _report(tmp_path)["refit"] is None


def test_uniform_ptq_takes_no_refit(tmp_path):
    with pytest.raises(ConfigError, match="option 'refit_epochs': uniform-ptq does not fine-tune"):
        _run(tmp_path, method="uniform-ptq", refit_epochs=1)
    with pytest.raises(ConfigError, match="refit_epochs"):
        _run(tmp_path, refit_epochs=-1)


def test_a_damaged_refit_checkpoint_is_a_one_line_error_naming_it(tmp_path, whole):
    import shutil

    refitted, _ = whole
    shutil.copytree(refitted / "out.work", tmp_path / "out.work")
    (tmp_path / "out.work" / "refit" / "velocity-60.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ConfigError, match=r"refit/velocity-60.npz is not a checkpoint impq-onnx wrote \(BadZipFile\); "
                                          r"the work dir is damaged: remove .*out.work/refit to refit anew$"):
        _run(tmp_path, refit_epochs=2, resume=True)
    (tmp_path / "out.work" / "refit" / "refit.json").write_text("{")
    with pytest.raises(ConfigError, match=r"refit.json: unreadable .*; remove .*refit to refit anew$"):
        _run(tmp_path, refit_epochs=2, resume=True)
    settings = {"version": 1, "from_iteration": 1, "epochs": 2.0, "steps": 60, "lr": 0.005}
    for record in ([], dict(settings, done="30", seconds=1.0, losses=[], result=None),
                   dict(settings, done=61, seconds=1.0, losses=[], result=None)):
        (tmp_path / "out.work" / "refit" / "refit.json").write_text(json.dumps(record))
        with pytest.raises(ConfigError, match=r"refit.json: not a refit record impq-onnx wrote; remove .*refit to "
                                              r"refit anew$"):
            _run(tmp_path, refit_epochs=2, resume=True)
    assert not (tmp_path / "out.onnx").exists()


def test_a_diverging_refit_writes_the_search_output_and_says_so(tmp_path, whole, monkeypatch):
    """The refit's own handling of a divergence (the fine-tune itself is tested in tests/engine): its part raises
    FineTuneDiverged; the output is the search's, the report and the page say why, and a resume keeps that."""
    from impq_onnx.engine import FineTuneDiverged

    _, plain = whole

    def diverging(*args, **kwargs):
        raise FineTuneDiverged(float("nan"), 7, [0.5], 0.1)

    monkeypatch.setattr(refit_module, "fine_tune", diverging)
    events = []
    _run(tmp_path, refit_epochs=2, progress=events.append)
    block = _report(tmp_path)["refit"]
    assert block["diverged"] == "the training loss became nan at step 7; lower the learning rate" and not block["kept"]
    assert _outputs(tmp_path) == _outputs(plain)
    assert any(str(e).startswith("refit: diverged (the training loss became nan") for e in events)
    monkeypatch.undo()
    _run(tmp_path, refit_epochs=2, resume=True)  # recorded: not run again
    assert _outputs(tmp_path) == _outputs(plain) and _report(tmp_path)["refit"]["diverged"] == block["diverged"]


def test_a_refit_with_learned_clips_resumes_to_the_uninterrupted_bytes(tmp_path, monkeypatch):
    """act_clip learned: the refit trains the activation steps too; an interrupted refit resumes from the clips
    its first part learned (refit.json) to an uninterrupted refit's bytes, and the written plan holds the
    clips the refit learned (not the search's), which the lowered model is verified with."""
    monkeypatch.setattr(refit_module, "PART_MIN_STEPS", 1)
    options = dict(phases="activations", start_act_bits=4, target_act_bits=None, act_clip="learned",
                   refit_epochs=2)

    def stop_after_the_first_part(event):
        if event.phase == "refit" and str(event).startswith("refit: step 30/60"):
            raise Interrupted

    _run(tmp_path / "whole", **options)
    with pytest.raises(Interrupted):
        _run(tmp_path / "parts", progress=stop_after_the_first_part, **options)
    first = json.loads((tmp_path / "parts" / "out.work" / "refit" / "refit.json").read_text())
    _run(tmp_path / "parts", resume=True, **options)
    assert _outputs(tmp_path / "parts") == _outputs(tmp_path / "whole")
    report = _report(tmp_path / "whole")
    assert report["refit"]["kept"] and report["verification"]["ok"]
    from impq_onnx.quant.plan import PrecisionPlan

    written = PrecisionPlan.load(tmp_path / "whole" / "out.plan.yaml")
    search = PrecisionPlan.load(tmp_path / "whole" / "out.work" / "iterations"
                                / f"{report['iterations'][-1]['iteration']:04d}" / "plan.yaml")
    learned = json.loads((tmp_path / "whole" / "out.work" / "refit" / "refit.json").read_text())["clips"]
    assert set(learned) == set(written.activations) and first["clips"] != learned
    assert all(written.clips[t].value == learned[t] != search.clips[t].value for t in learned)


def test_averaging_the_last_epochs_writes_their_mean_and_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """refit_average_epochs 2 of 3: the first epoch's cosine ends at a fifth of the rate, the last two run at it,
    and the written weights are the mean of the weights after each of those two parts (with batchnorm train, the
    statistics re-estimated); interrupted after the first averaged part, the refit resumes with its running mean
    (``average-<step>.npz``) to the uninterrupted run's bytes."""
    from onnx import numpy_helper

    from impq_onnx.search.checkpoint import values_from_bytes

    monkeypatch.setattr(refit_module, "PART_MIN_STEPS", 1)
    options = dict(refit_epochs=3, refit_average_epochs=2, batchnorm="train")

    def stop_after_the_second_part(event):
        if event.phase == "refit" and str(event).startswith("refit: step 60/90"):
            raise Interrupted

    with pytest.raises(Interrupted):
        _run(tmp_path / "parts", progress=stop_after_the_second_part, **options)
    folder = tmp_path / "parts" / "out.work" / "refit"
    assert json.loads((folder / "refit.json").read_text())["averaged"] == 1
    second = values_from_bytes((folder / "weights-60.npz").read_bytes())
    # one part averaged: its weights are the mean
    assert {k: v.tobytes() for k, v in values_from_bytes((folder / "average-60.npz").read_bytes()).items()} == {
        k: v.tobytes() for k, v in second.items()}
    events = []
    _run(tmp_path / "parts", resume=True, progress=events.append, **options)
    assert any("resuming after step 60" in str(e) for e in events)
    _run(tmp_path / "whole", **options)
    assert _outputs(tmp_path / "parts") == _outputs(tmp_path / "whole")
    assert _strip(_report(tmp_path / "parts")["refit"]) == _strip(_report(tmp_path / "whole")["refit"])
    assert sorted(p.name for p in folder.iterdir()) == ["average-90.npz", "refit.json", "velocity-90.npz",
                                                        "weights-90.npz"]
    from impq_onnx.report import read_run
    from impq_onnx.report.html import summary_rows

    rows = dict(r for r in summary_rows(read_run(tmp_path / "whole" / "out.work")) if r is not None)
    average = _report(tmp_path / "whole")["refit"]["average"]
    assert (f"(the last 2 epochs averaged: {100 * average['val_agreement']:.2f} % against the last weights' "
            f"{100 * average['last_val_agreement']:.2f} %, used) vs the search's" in rows["refit"])
    computed = _report(tmp_path / "whole")["refit"]
    _run(tmp_path / "whole", resume=True, **options)  # finished: read back from refit.json, in the same order
    assert list(_report(tmp_path / "whole")["refit"].items()) == list(computed.items())
    assert _outputs(tmp_path / "whole") == _outputs(tmp_path / "parts")
    with pytest.raises(ConfigError, match=r"holds a refit with average_epochs 2, not None"):  # nor the reverse
        _run(tmp_path / "whole", refit_epochs=3, resume=True)
    third = values_from_bytes((folder / "weights-90.npz").read_bytes())
    block = _report(tmp_path / "whole")["refit"]["average"]
    assert (block["epochs"], block["parts"], block["lr"]) == (2, 2, 0.001)
    # the average is written when it validates at least as well as the last weights (here: both 92.5 % agreement)
    assert block["used"] and (block["val_agreement"], block["val_top1"]) >= (block["last_val_agreement"],
                                                                              block["last_val_top1"])
    written = {t.name: numpy_helper.to_array(t) for t in load(tmp_path / "whole" / "out.float.onnx").to_proto()
               .graph.initializer}
    for name in ("conv1.weight", "conv4.weight", "fc.weight"):
        assert not np.array_equal(second[name], third[name])
        np.testing.assert_allclose(written[name], (second[name] + third[name]) / 2, rtol=1e-6, atol=1e-7)
    statistics = [n for n in third if n.endswith(("running_mean", "running_var"))]
    assert statistics and all(not np.allclose(written[n], (second[n] + third[n]) / 2) for n in statistics)


def test_averaging_needs_a_longer_refit_and_its_own_refit_folder(tmp_path, whole, monkeypatch):
    import shutil

    with pytest.raises(ConfigError, match=r"option 'refit_average_epochs': 2 needs refit_epochs above it \(now 2\)"):
        _run(tmp_path, refit_epochs=2, refit_average_epochs=2)
    with pytest.raises(ConfigError, match=r"option 'refit_average_epochs': 1 needs refit_epochs above it \(now 0\)"):
        _run(tmp_path, refit_average_epochs=1)
    # a finished refit without averaging is refused, not overwritten, by a resume that averages
    monkeypatch.setattr(refit_module, "PART_MIN_STEPS", 1)
    shutil.copytree(whole[0] / "out.work", tmp_path / "out.work")
    with pytest.raises(ConfigError, match=r"holds a refit with average_epochs None, not 1: give the same refit_epochs, "
                                          r"refit_average_epochs and lr, or remove .*refit to refit anew$"):
        _run(tmp_path, refit_epochs=2, refit_average_epochs=1, resume=True)


def test_the_refit_takes_its_own_learning_rate(tmp_path, whole, monkeypatch):
    """refit_lr: the refit's peak rate, apart from the search's lr (part of the search's identity): a finished
    search resumed with it runs only the refit, at that rate; a refit folder of another rate is refused."""
    import shutil

    refitted, plain = whole
    monkeypatch.setattr(refit_module, "PART_MIN_STEPS", 1)
    shutil.copytree(refitted / "out.work", tmp_path / "refused" / "out.work")
    with pytest.raises(ConfigError, match=r"holds a refit with lr 0.005, not 0.01: give the same refit_epochs"):
        _run(tmp_path / "refused", refit_epochs=2, refit_lr=0.01, resume=True)
    shutil.copytree(plain / "out.work", tmp_path / "own" / "out.work")
    events = []
    _run(tmp_path / "own", refit_epochs=2, refit_lr=0.01, resume=True, progress=events.append)
    assert not any(e.kind == "iteration" for e in events)  # the search is the one the fixture ran
    assert any(str(e).startswith("refit: the plan of iteration 1 from the float weights, 2 epochs (60 steps) at lr "
                                 "0.01") for e in events)
    assert _report(tmp_path / "own")["refit"]["lr"] == 0.01
    assert (tmp_path / "own" / "out.float.onnx").read_bytes() != (refitted / "out.float.onnx").read_bytes()
    with pytest.raises(ConfigError, match=r"option 'refit_lr': 0.01 needs refit_epochs above 0"):
        _run(tmp_path / "bad", refit_lr=0.01)
    with pytest.raises(ConfigError, match="refit_lr"):
        _run(tmp_path / "bad", refit_epochs=2, refit_lr=0)
