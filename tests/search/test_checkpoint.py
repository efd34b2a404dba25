"""The work directory: atomic files, the commit point, exact parameter round trips."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from impq_onnx.architectures import fashion_net
from impq_onnx.errors import ConfigError
from impq_onnx.frontend.canonical import from_proto
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.checkpoint import WorkDir, values_from_bytes, values_to_bytes, write_atomic
from impq_onnx.frontend.site_analysis import find_sites


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, "one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["a.json"]


def test_values_round_trip_bit_exactly():
    rng = np.random.default_rng(0)
    values = {"conv1.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
              "bn/1.running_mean": np.zeros(3, np.float32)}
    back = values_from_bytes(values_to_bytes(values))
    assert sorted(back) == sorted(values)
    for name in values:
        assert back[name].dtype == values[name].dtype and back[name].tobytes() == values[name].tobytes()


def test_iterations_commit_and_prune(tmp_path):
    sites = find_sites(from_proto(fashion_net()), (1, 1, 28, 28))
    plan = PrecisionPlan.uniform(sites, 4, None)
    work = WorkDir(tmp_path / "work")
    work.start({"seed": 0})
    work.start({"seed": 0})  # nothing committed yet: starting over is allowed
    for i in range(3):
        work.save_iteration(i, plan, {"w": np.full(2, i, np.float32)}, {"iteration": i})
        work.commit({"iteration": i})
        work.prune({i, 0})
    assert work.load_state()["iteration"] == 2
    back, values = work.load_iteration(2)
    assert back.to_yaml() == plan.to_yaml() and values["w"].tolist() == [2, 2]
    assert not (work.iteration_dir(1) / "weights.npz").exists()
    assert (work.iteration_dir(0) / "weights.npz").exists()
    with pytest.raises(ConfigError, match="--resume"):
        work.start({"seed": 0})  # a committed run is never overwritten silently
    work.check_identity({"seed": 0})
    with pytest.raises(ConfigError, match="'seed' was 0 and is now 1"):
        work.check_identity({"seed": 1})
    with pytest.raises(ConfigError, match="without the option 'land_on_target'"):
        work.check_identity({"seed": 0, "land_on_target": True})  # written before the option existed
    # an option added later resumes such a work dir at the value that computes what the old version did
    work.check_identity({"seed": 0, "batchnorm": "train"}, {"batchnorm": "train"})
    with pytest.raises(ConfigError, match="without the option 'batchnorm'"):
        work.check_identity({"seed": 0, "batchnorm": "frozen"}, {"batchnorm": "train"})
    # an option whose default became derived (None): a work dir that ran at the old default resumes with it
    lr_work = WorkDir(tmp_path / "lr")
    lr_work.start({"seed": 0, "lr": 0.005})
    assert lr_work.check_identity({"seed": 0, "lr": None}, {"lr": 0.005}) == {"lr": 0.005}
    assert lr_work.check_identity({"seed": 0, "lr": 0.005}, {"lr": 0.005}) == {}
    with pytest.raises(ConfigError, match="'lr' was 0.005 and is now 0.001"):
        lr_work.check_identity({"seed": 0, "lr": 0.001}, {"lr": 0.005})
    # an option added after the work dir and not given now: the value the version without it ran with
    assert work.check_identity({"seed": 0, "batchnorm": None}, {"batchnorm": "train"}) == {"batchnorm": "train"}
    lr_work.start({"seed": 0, "lr": None})  # a new work dir, derived rate: resumes only without --lr
    assert lr_work.check_identity({"seed": 0, "lr": None}, {"lr": 0.005}) == {}
    with pytest.raises(ConfigError, match="'lr' was None and is now 0.005"):
        lr_work.check_identity({"seed": 0, "lr": 0.005}, {"lr": 0.005})


def test_a_work_dir_from_before_act_clip_resumes_only_with_the_paper_clip(tmp_path):
    from impq_onnx.compression import _LEGACY, CompressConfig

    work = WorkDir(tmp_path / "w")
    work.start({"seed": 0})  # run.json of a version without the option
    assert CompressConfig().act_clip is None  # not given: resolved when the run starts (mse for impq)
    assert work.check_identity({"seed": 0, "act_clip": None}, _LEGACY) == {"act_clip": "paper"}
    assert work.check_identity({"seed": 0, "act_clip": "paper"}, _LEGACY) == {}
    with pytest.raises(ConfigError, match="without the option 'act_clip' \\(now 'mse'\\)"):
        work.check_identity({"seed": 0, "act_clip": "mse"}, _LEGACY)


def test_a_work_dir_that_ranked_with_the_paper_weighting_resumes_with_it(tmp_path):
    """weighting became a derived default (measured): a work dir that recorded the old default resumes with it
    when the option is not given; one that recorded another weighting needs that weighting given again."""
    from impq_onnx.compression import _LEGACY, CompressConfig

    assert CompressConfig().weighting is None
    assert CompressConfig(model="m.onnx", data="d").validate().with_derived_defaults().weighting == "measured"
    work = WorkDir(tmp_path / "w")
    work.start({"seed": 0, "weighting": "paper"})
    assert work.check_identity({"seed": 0, "weighting": None}, _LEGACY) == {"weighting": "paper"}
    assert work.check_identity({"seed": 0, "weighting": "paper"}, _LEGACY) == {}
    with pytest.raises(ConfigError, match="'weighting' was 'paper' and is now 'measured'"):
        work.check_identity({"seed": 0, "weighting": "measured"}, _LEGACY)
    stepped = WorkDir(tmp_path / "s")
    stepped.start({"seed": 0, "weighting": "step"})
    with pytest.raises(ConfigError, match="'weighting' was 'step' and is now None"):
        stepped.check_identity({"seed": 0, "weighting": None}, _LEGACY)


def test_act_clip_mse_is_refused_for_methods_with_their_own_clips():
    from impq_onnx.compression import CompressConfig

    for method in ("faq", "activation-density"):
        with pytest.raises(ConfigError, match=f"'act_clip': mse works with method impq or uniform-ptq; {method}"):
            CompressConfig(model="m.onnx", data="d", method=method, act_clip="mse").validate()
    with pytest.raises(ConfigError, match="option 'act_clip': 'least-squares' is not one of paper, mse, learned"):
        CompressConfig(model="m.onnx", data="d", act_clip="least-squares").validate()
    for method, why in (("uniform-ptq", "does not fine-tune"), ("faq", "sets its own clips")):
        with pytest.raises(ConfigError, match=f"'act_clip': learned works with method impq; {method} {why}"):
            CompressConfig(model="m.onnx", data="d", method=method, act_clip="learned").validate()
    assert CompressConfig(model="m.onnx", data="d", act_clip="learned").validate().act_clip == "learned"
    assert CompressConfig(model="m.onnx", data="d", method="uniform-ptq", act_clip="mse").validate().act_clip == "mse"
    # not given: mse for impq, paper for every other method (faq and activation-density set their own clips)
    for method, clip in (("impq", "mse"), ("uniform-ptq", "paper"), ("faq", "paper"), ("activation-density", "paper")):
        cfg = CompressConfig(model="m.onnx", data="d", method=method).validate()
        assert cfg.with_derived_defaults().act_clip == clip


def test_weight_scheme_is_midrise_rms_only_for_an_impq_weight_phase_below_4_bits(tmp_path):
    """weight_scheme became a derived default: the RMS-fitted step where impq's weight target is below 4 bits, the
    max step everywhere else; a work dir that recorded the old default (midrise-max) resumes with it."""
    from impq_onnx.compression import _LEGACY, CompressConfig

    assert CompressConfig().weight_scheme is None
    cases = [({"target_bits": 1.74}, "midrise-rms"), ({"target_bits": 3.99}, "midrise-rms"),
             ({"target_bits": 4.0}, "midrise-max"), ({"target_bits": None}, "midrise-max"),
             ({"target_bits": 2, "phases": "activations"}, "midrise-max"),
             ({"target_bits": 2, "method": "uniform-ptq"}, "midrise-max"),
             ({"target_bits": 2, "method": "activation-density", "act_clip": "paper"}, "midrise-max"),
             ({"target_bits": 2, "weight_scheme": "midrise-max"}, "midrise-max"),
             ({"target_bits": 8, "weight_scheme": "midrise-rms"}, "midrise-rms")]
    for options, scheme in cases:
        cfg = CompressConfig(model="m.onnx", data="d", **options).validate()
        assert cfg.with_derived_defaults().weight_scheme == scheme, options
    work = WorkDir(tmp_path / "w")
    work.start({"seed": 0, "weight_scheme": "midrise-max"})  # a work dir of the version with the fixed default
    assert work.check_identity({"seed": 0, "weight_scheme": None}, _LEGACY) == {"weight_scheme": "midrise-max"}
    with pytest.raises(ConfigError, match="'weight_scheme' was 'midrise-max' and is now 'midrise-rms'"):
        work.check_identity({"seed": 0, "weight_scheme": "midrise-rms"}, _LEGACY)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "pickled", "foreign npz", "missing"])
def test_a_damaged_weights_checkpoint_is_a_one_line_error_naming_it(tmp_path, damage):
    import io

    sites = find_sites(from_proto(fashion_net()), (1, 1, 28, 28))
    work = WorkDir(tmp_path / "work")
    work.start({"seed": 0})
    work.save_iteration(0, PrecisionPlan.uniform(sites, 4, None), {"w": np.ones(3, np.float32)}, {"iteration": 0})
    path = work.iteration_dir(0) / "weights.npz"
    good = path.read_bytes()
    if damage == "missing":
        path.unlink()
    else:
        buffer = io.BytesIO()
        if damage == "pickled":
            np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
        elif damage == "foreign npz":
            np.savez(buffer, x=np.zeros(2))
        path.write_bytes({"garbage": b"not a zip", "truncated": good[: len(good) // 2]}.get(damage, buffer.getvalue()))
    with pytest.raises(ConfigError, match=r"^work_dir .*work: iterations/0000/weights.npz is not a checkpoint "
                                          r"impq-onnx wrote \(\w+\); the work dir is damaged: remove it to start "
                                          r"over$"):
        work.load_iteration(0)


def test_keep_ends_is_an_impq_option_with_a_floor_per_kernel_or_layer(tmp_path):
    """keep_ends: refused (ConfigError, a one-line exit 2 on the CLI) for methods that set bits by their own rule and
    for network granularity, bounded like bits; a work dir written before the option resumes with it at 0 and
    refuses a floor."""
    from impq_onnx.compression import _LEGACY, CompressConfig

    for method in ("uniform-ptq", "faq", "activation-density"):
        with pytest.raises(ConfigError, match=f"option 'keep_ends': works with method impq; {method}"):
            CompressConfig(model="m.onnx", data="d", method=method, keep_ends=8).validate()
    with pytest.raises(ConfigError, match="option 'keep_ends': granularity network has one weight group"):
        CompressConfig(model="m.onnx", data="d", granularity="network", keep_ends=8).validate()
    with pytest.raises(ConfigError, match="option 'keep_ends'"):
        CompressConfig(model="m.onnx", data="d", keep_ends=17).validate()
    assert CompressConfig(model="m.onnx", data="d", granularity="layer", keep_ends=8).validate().keep_ends == 8
    assert CompressConfig(model="m.onnx", data="d", method="faq").validate().keep_ends == 0
    work = WorkDir(tmp_path / "w")
    work.start({"seed": 0})
    assert work.check_identity({"seed": 0, "keep_ends": 0}, _LEGACY) == {}
    with pytest.raises(ConfigError, match="without the option 'keep_ends' \\(now 4\\)"):
        work.check_identity({"seed": 0, "keep_ends": 4}, _LEGACY)


def test_a_resume_on_other_arithmetic_is_named_in_one_warning_line(tmp_path):
    """machine.json records the arithmetic a run started on; a resume compares: the same machine says nothing,
    another CPU (vendor or vector flags) or onnxruntime is one line naming what changed, and a work dir from
    before machine.json (or a damaged one) cannot say, so it says nothing."""
    from impq_onnx.runtime import arithmetic

    work = WorkDir(tmp_path / "work")
    work.start({"seed": 0})
    here = arithmetic()
    assert here["vector_flags"] == sorted(here["vector_flags"]) and here["onnxruntime"]
    assert work.machine_change() is None and work.machine_change(here) is None
    elsewhere = dict(here, cpu_vendor="GenuineIntel" if here["cpu_vendor"] != "GenuineIntel" else "AuthenticAMD",
                     vector_flags=["avx", "avx2", "avx512f", "fma"])
    line = work.machine_change(elsewhere)
    assert line is not None and "\n" not in line and line.startswith(f"work_dir {work.path}: ")
    assert f"cpu_vendor {here['cpu_vendor']} then, {elsewhere['cpu_vendor']} now" in line
    assert "vector_flags " in line and "avx+avx2+avx512f+fma now" in line
    assert "onnxruntime" not in line.split("(", 1)[1].split(")", 1)[0]  # only what changed is named
    hostile = work.machine_change(dict(here, cpu_vendor="Evil\nVendor " + "x" * 5000))
    assert hostile is not None and "\n" not in hostile and len(hostile) < 1000
    (work.path / "machine.json").write_text("not json")
    assert work.machine_change(elsewhere) is None
    (work.path / "machine.json").unlink()
    assert work.machine_change(elsewhere) is None


def test_arithmetic_reads_the_first_processor_and_keeps_only_vector_flags(tmp_path):
    from impq_onnx.runtime import arithmetic, cpu_fields

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\n"
                    "flags\t\t: fpu sse4_2 avx2 fma avx512f avx512_vnni ht\n\nprocessor\t: 1\nvendor_id\t: other\n")
    assert cpu_fields(str(info))["model name"] == "Xeon"
    got = arithmetic(str(info))
    assert got["cpu_vendor"] == "GenuineIntel"
    assert got["vector_flags"] == ["avx2", "avx512_vnni", "avx512f", "fma", "sse4_2"]
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50\nFeatures\t: fp asimd sve crc32\nCPU implementer\t: 0x41\n")
    assert arithmetic(str(arm))["cpu_vendor"] == "0x41" and arithmetic(str(arm))["vector_flags"] == ["asimd", "sve"]
    missing = arithmetic(str(tmp_path / "none"))
    assert missing["cpu_vendor"] is None and missing["vector_flags"] == []


@pytest.mark.parametrize("name, text, words", [
    ("run.json", "[1, 2]", "run.json holds a list, not a run's identity (damaged); cannot resume"),
    ("state.json", '{"version": 1, "records": 5}', "state.json is not a run's state (damaged); cannot resume"),
    ("state.json", "[]", "state.json is not a run's state (damaged)"),
])
def test_a_damaged_run_or_state_file_is_a_config_error_on_resume(tmp_path, name, text, words):
    """Before: compress --resume on such a work dir exited 1, "unexpected TypeError / AttributeError"."""
    work = WorkDir(tmp_path / "w")
    work.path.mkdir()
    (work.path / name).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(words)):
        work.check_identity({"seed": 0}) if name == "run.json" else work.load_state()
