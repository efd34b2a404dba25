"""Hostile plans, tampered lowered models and non-finite weights: one line (exit 2), a failed verification
(exit 3, naming tensor, channel and index) or a warning naming the initializer; inputs never written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hostile_inputs import assert_one_line_error, digest, image_tree, impq, tiny_model
from onnx import numpy_helper

from impq_onnx.cli import EXIT_VERIFY_FAILED
from impq_onnx.errors import PlanError
from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan


def _plan(model, path, **changes) -> PrecisionPlan:
    sites = find_sites(load(model))
    plan = PrecisionPlan.uniform(sites, 3, 4, default_clip=2.0)
    for key, value in changes.items():
        getattr(plan, key).update(value)
    path.write_text(yaml.safe_dump(plan.to_dict()))
    return plan


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d["clips"]["r1"].update(value=1e300), "clips['r1'].value 1e+300 must be a finite number"),
    (lambda d: d["clips"]["r1"].update(value=float("nan")), "clips['r1'].value nan"),
    (lambda d: d["clips"]["r1"].update(value=-2.0), "clips['r1'].value -2.0"),
    (lambda d: d["clips"]["r1"].update(value=1e-300), "clips['r1'].value 1e-300"),
    (lambda d: d["clips"]["r1"].update(signed="yes"), "clips['r1']"),
    (lambda d: d["activations"].update(r1=4.5), "activations['r1']: bits must be an int"),
    (lambda d: d["weights"]["conv1"].__setitem__(0, 17), "weights['conv1'][0]: bits must be an int in 1..16"),
    (lambda d: d["weights"]["conv1"].__setitem__(0, True), "weights['conv1'][0]"),
    (lambda d: d.update(weight_scheme="midrise-maxx"), "weight_scheme 'midrise-maxx' is unknown"),
])
def test_a_bad_plan_field_is_one_line_naming_the_key(tmp_path, edit, fragment):
    model = tiny_model(tmp_path / "m.onnx")
    plan = _plan(model, tmp_path / "plan.yaml")
    document = plan.to_dict()
    edit(document)
    with pytest.raises(PlanError) as info:
        PrecisionPlan.from_yaml(yaml.safe_dump(document), "plan.yaml").validate(find_sites(load(model)))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_lower_refuses_a_clip_of_1e300_and_writes_nothing(tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    _plan(model, tmp_path / "plan.yaml")
    document = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    document["clips"]["r1"]["value"] = 1e300
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(document))
    before = digest(tmp_path)
    result = impq("lower", model, "--plan", tmp_path / "plan.yaml", "-o", tmp_path / "out.onnx")
    assert_one_line_error(result, 2, "plan.yaml", "clips['r1'].value 1e+300 must be a finite number in 1e-30..1e+30")
    assert digest(tmp_path) == before  # no out.onnx, no sidecar, inputs unchanged


def _nested_plan(depth: int) -> str:
    return "schema_version: 1\nweights: " + "[" * depth + "]" * depth + "\n"


def _alias_bomb_plan() -> str:
    lines = ["schema_version: 1", 'a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdef", "bcdefg"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\ngranularity: *g\n"


@pytest.mark.parametrize("name, text, words", [
    ("plan.yaml", lambda good: good.replace("value: 2.0", "value: " + "9" * 5000, 1),
     "a number of 5000 digits; write one of at most 64"),
    ("plan.yaml", lambda good: good + "granularity: layer\n", "the key 'granularity' is given twice"),
    ("plan.yaml", lambda good: _nested_plan(100_000), "nested too deeply"),
    ("plan.yaml", lambda good: _alias_bomb_plan(), "aliases are expanded"),
    ("plan.json", lambda good: good.rstrip()[:-1] + ', "granularity": "layer"}',
     "the key 'granularity' is given twice in one object"),
    ("plan.json", lambda good: '{"schema_version": ' + "9" * 5000 + "}", "a number of 5000 digits"),
    ("plan.json", lambda good: good.replace('"value": 2.0', '"value": ' + "9" * 400, 1),
     "a number of 400 digits; write one of at most 64"),  # under Python's limit: float() overflowed, exit 1
    ("plan.yaml", lambda good: good.replace("value: 2.0", "value: 0x" + "f" * 4000, 1),
     "a number of 4002 digits"),  # hex: 16000 bits, and its repr in the message raised, exit 1
    ("plan.json", lambda good: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("plan.yaml", lambda good: good.replace("conv1:", "conv9:"),
     "weights: layer 'conv9' is not a quantizable layer of the model"),
])
def test_a_hostile_plan_file_is_one_line_naming_it(tmp_path, name, text, words):
    """Before: a 5000-digit number or deep nesting was exit 1 ("unexpected ValueError / RecursionError"), a key
    given twice was taken silently (the last one won), an alias bomb expanded into a 4 MB error line, and a plan
    that did not fit the model was refused without naming the plan file."""
    model = tiny_model(tmp_path / "m.onnx")
    plan = _plan(model, tmp_path / "good.yaml")
    good = plan.to_json() if name.endswith(".json") else plan.to_yaml()
    (tmp_path / name).write_text(text(good))
    before = digest(tmp_path)
    result = impq("lower", model, "--plan", tmp_path / name, "-o", tmp_path / "out.onnx")
    assert_one_line_error(result, 2, name, words)
    assert len(result.stderr) < 1000
    assert digest(tmp_path) == before


def test_a_large_plan_the_tool_writes_is_read_back(tmp_path):
    """The alias-bomb limit counts expansion, not size: a plan of 150,000 kernels (a model as wide as
    Wide-ResNet-101) without aliases, as to_yaml writes it, is read back; it was refused as 'an alias bomb?'."""
    plan = PrecisionPlan(weights={f"layer{i}": [4] * 1000 for i in range(150)}, activations={}, clips={})
    for name in ("big.yaml", "big.json"):
        (tmp_path / name).write_text(plan.to_json() if name.endswith(".json") else plan.to_yaml())
        assert PrecisionPlan.load(tmp_path / name).weights == plan.weights


def _lowered(tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    plan = _plan(model, tmp_path / "plan.yaml")
    out = tmp_path / "q.onnx"
    assert impq("lower", model, "--plan", tmp_path / "plan.yaml", "-o", out).returncode == 0
    return model, plan, out, image_tree(tmp_path / "data")


def _verify(model, out, tmp_path, data):
    return impq("verify", out, "--model", model, "--plan", tmp_path / "plan.yaml", "--data", data)


def test_verify_fails_with_exit_3_on_one_changed_in_range_code(tmp_path):
    model, _, out, data = _lowered(tmp_path)
    assert _verify(model, out, tmp_path, data).returncode == 0
    proto = onnx.load(out)
    init = next(t for t in proto.graph.initializer if t.name == "conv2.w_quantized")
    codes = numpy_helper.to_array(init).copy()
    index = tuple(int(i) for i in np.argwhere(codes == -1)[0])  # -1 -> 1: both on the 3-bit midrise grid
    codes[index] = 1
    init.CopyFrom(numpy_helper.from_array(codes, init.name))
    onnx.save(proto, out)
    before = digest(tmp_path)
    result = _verify(model, out, tmp_path, data)
    assert result.returncode == EXIT_VERIFY_FAILED == 3 and "Traceback" not in result.stderr
    assert "FAILED" in result.stdout
    assert (f"weight 'conv2.w_quantized' (layer 'conv2') channel {index[0]} index {list(index)}: code 1, "
            "the float model and the plan give -1") in result.stdout
    assert digest(tmp_path) == before


def test_verify_fails_on_a_negated_scale_with_negated_codes(tmp_path):
    model, _, out, data = _lowered(tmp_path)
    proto = onnx.load(out)
    for t in proto.graph.initializer:
        if t.name in ("fc.w_quantized", "fc.w_scale"):
            t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), t.name))
    onnx.save(proto, out)
    result = _verify(model, out, tmp_path, data)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert "channel 0: scale -" in result.stdout and "not a positive finite number" in result.stdout
    verdict = json.loads(impq("verify", out, "--model", model, "--plan", tmp_path / "plan.yaml", "--data", data,
                              "--json").stdout)
    assert verdict["ok"] is False and verdict["max_logit_diff"] == 0.0  # the logits alone would have passed


def test_nan_and_inf_weights_get_a_warning_naming_the_initializer(tmp_path):
    proto = onnx.load(tiny_model(tmp_path / "m.onnx"))
    for t in proto.graph.initializer:
        if t.name == "conv2.w":
            w = numpy_helper.to_array(t).copy()
            w.flat[:3] = [np.nan, np.inf, -np.inf]
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    model = tiny_model(tmp_path / "nan.onnx", proto)
    data = image_tree(tmp_path / "data")
    before = digest(tmp_path)
    result = impq("evaluate", model, "--data", data)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert any("initializer 'conv2.w' holds 3 NaN/infinite value(s)" in line for line in warnings), result.stderr
    assert digest(tmp_path) == before


def test_verify_of_a_damaged_lowered_file_fails_with_exit_3_not_a_traceback(tmp_path):
    model, _, out, data = _lowered(tmp_path)
    proto = onnx.load(out)
    scale = next(t for t in proto.graph.initializer if t.name == "conv2.w_scale")
    proto.graph.initializer.remove(scale)
    onnx.save(proto, out)
    sidecar = json.loads((tmp_path / "q.onnx.bits.json").read_text())
    del sidecar["weights"]["fc"]["axis"]
    (tmp_path / "q.onnx.bits.json").write_text(json.dumps(sidecar))
    before = digest(tmp_path)
    result = _verify(model, out, tmp_path, data)
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr
    assert "FAILED" in result.stdout and "conv2" in result.stdout
    assert digest(tmp_path) == before


@pytest.mark.parametrize("option", ["plan", "config", "classes", "sidecar"])
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_given_as_an_input_file_is_refused_without_reading_it(tmp_path, option, kind):
    """A FIFO with no writer blocked the command forever (``--config``), and ``--plan /dev/zero`` read until the
    memory ran out; each input file is now opened non-blocking and refused unless it is a regular file."""
    model, data = tiny_model(tmp_path / "m.onnx"), image_tree(tmp_path / "data")
    plan = tmp_path / "p.plan.yaml"
    _plan(model, plan)
    lowered = tmp_path / "low.onnx"
    assert impq("lower", model, "--plan", plan, "-o", lowered).returncode == 0
    trap = tmp_path / "trap"
    if kind == "fifo":
        os.mkfifo(trap)
    else:
        trap = Path("/dev/zero")
    if option == "sidecar":
        sidecar = tmp_path / "low.onnx.bits.json"
        sidecar.unlink()
        sidecar.symlink_to(trap)
        args = ["verify", lowered, "--model", model, "--plan", plan, "--data", data]
    else:
        args = {"plan": ["evaluate", model, "--data", data, "--plan", trap],
                "config": ["compress", model, "--data", data, "--output", tmp_path / "o.onnx", "--config", trap],
                "classes": ["evaluate", model, "--data", data, "--classes", trap]}[option]
    before = digest(tmp_path / "data")
    result = impq(*args, timeout=60)
    assert_one_line_error(result, 2, "not a regular file")
    assert digest(tmp_path / "data") == before and not (tmp_path / "o.onnx").exists()
