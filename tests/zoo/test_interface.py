"""Issue 24, the output keeps the input's interface: input and output names, element types (float16 stays
float16), declared shapes, every output (a second output computed as in the original) and the
Softmax/LogSoftmax head. Only weights and quantizers change; verify still compares the logits exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from lowering_cases import mixed_plan
from tiny_models import Quirks, build
from zoo_models import image_folder, static_batch, with_fixed_batch_output, with_tail

from impq_onnx.cli import main
from impq_onnx.frontend.canonical import from_proto, load
from impq_onnx.frontend.interface import core_view, interface_of
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.lowering.lower import lower
from impq_onnx.lowering.targets import target_names
from impq_onnx.lowering.verify import verify
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.runtime import inference_session

ZOO: dict[str, Callable[[], onnx.ModelProto]] = {
    "softmax-head": lambda: build(Quirks(softmax=True)),
    "softmax-identity": lambda: with_tail(["Softmax", "Identity"]),
    "identity-logsoftmax": lambda: with_tail(["Identity", "LogSoftmax"]),
    "logits-4d-squeeze-softmax": lambda: with_tail(["Squeeze", "Softmax"], logits_4d=True),
    "logits-4d": lambda: with_tail([], logits_4d=True),
    "second-output-fixed-batch": lambda: with_fixed_batch_output(128),
    "float16": lambda: build(Quirks(float16=True)),
    "float16-softmax-two-outputs": lambda: build(Quirks(float16=True, softmax=True, two_outputs=True)),
    "static-batch-1": lambda: static_batch(1),
    "static-batch-1-softmax": lambda: static_batch(1, quirks=Quirks(softmax=True)),
    "opset7-softmax": lambda: build(Quirks(opset=7, softmax=True)),
    "nhwc-float16": lambda: build(Quirks(nhwc=True, float16=True, softmax=True)),
}


def _head_ops(model: onnx.ModelProto) -> list[list[str]]:
    """Per output, the op types from the output back through Softmax/LogSoftmax/Identity/shape ops."""
    producers = {out: node for node in model.graph.node for out in node.output}
    heads = []
    for output in model.graph.output:
        ops, name = [], output.name
        while (node := producers.get(name)) is not None and node.op_type in (
                "Softmax", "LogSoftmax", "Identity", "Squeeze", "Flatten", "Reshape", "Cast"):
            ops.append(node.op_type)
            name = node.input[0]
        heads.append([op for op in ops if op != "Cast"])
    return heads


def _inputs(model: onnx.ModelProto, n: int = 4, seed: int = 0) -> np.ndarray:
    info = interface_of(model)["inputs"][0]
    shape = [d if isinstance(d, int) else n for d in info["shape"]]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(info["dtype"])
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = inference_session(model.SerializeToString())
    return session.run(None, {session.get_inputs()[0].name: x})


def _lowered(model: onnx.ModelProto, plan_of: Callable) -> tuple:
    canonical = from_proto(model)
    x = _inputs(model)
    sites = find_sites(canonical, (1, *x.shape[1:]) if canonical.input_layout == "NCHW" else None)
    plan = plan_of(sites)
    lowered = lower(canonical, plan, sites)
    lowered.proto = canonical.with_interface(lowered.proto)
    return canonical, sites, plan, lowered, x


@pytest.mark.parametrize("name", list(ZOO))
def test_lowered_model_keeps_the_interface(name: str) -> None:
    original = ZOO[name]()
    canonical, sites, plan, lowered, x = _lowered(original, lambda s: mixed_plan(s, "midrise-max"))
    onnx.checker.check_model(lowered.proto)
    assert interface_of(lowered.proto) == interface_of(original)  # names, element types, declared shapes
    assert _head_ops(lowered.proto) == _head_ops(original)
    ops = {node.op_type for node in lowered.proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    ours, theirs = _run(lowered.proto, x), _run(original, x)
    assert [(a.dtype, a.shape) for a in ours] == [(b.dtype, b.shape) for b in theirs]
    # The head is the original's: the first output is the head applied to the lowered model's own logits.
    logits = _run(core_view(lowered.proto), x.astype(np.float32))[0]
    head = _head_ops(original)[0]
    expected = logits
    if "Softmax" in head:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected = e / e.sum(axis=1, keepdims=True)
    elif "LogSoftmax" in head:
        expected = logits - logits.max(axis=1, keepdims=True)
        expected = expected - np.log(np.exp(expected).sum(axis=1, keepdims=True))
    tolerance = 2e-3 if ours[0].dtype == np.float16 else 1e-5
    np.testing.assert_allclose(ours[0].astype(np.float32).reshape(expected.shape), expected, atol=tolerance,
                               rtol=tolerance)
    result = verify(lowered, canonical, plan, sites, [x.astype(np.float32)])  # exact, on the logits
    assert result.ok and result.max_logit_diff == 0.0, result.to_dict()


@pytest.mark.parametrize("name", ["second-output-fixed-batch", "float16-softmax-two-outputs", "softmax-identity",
                                  "static-batch-1-softmax"])
def test_float_plan_computes_every_output_as_the_original(name: str) -> None:
    original = ZOO[name]()
    _, _, _, lowered, x = _lowered(original, lambda s: PrecisionPlan.uniform(s, None, None, default_clip=4.0))
    tolerance = 2e-2 if x.dtype == np.float16 else 1e-5
    for ours, theirs in zip(_run(lowered.proto, x), _run(original, x), strict=True):
        np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), atol=tolerance, rtol=tolerance)


def test_output_cut_by_output_option_is_the_interface() -> None:
    original = build(Quirks(softmax=True, two_outputs=True))
    canonical = from_proto(original, output="logits")
    assert canonical.original is None  # an inner tensor was asked for: the cut is the interface
    canonical = from_proto(original, output="probs")
    assert canonical.original is not None


def test_compress_writes_the_original_interface(tmp_path: Path) -> None:
    original = build(Quirks(float16=True, softmax=True, two_outputs=True))
    path = tmp_path / "m.onnx"
    onnx.save(original, path)
    data = image_folder(tmp_path / "data", per_class=4)
    from impq_onnx.compression import compress

    compress(path, data, output=tmp_path / "out.onnx", progress=False, steps=1, start_steps=1,
             sensitivity_samples=8, batch_size=8, max_iterations=1, target_bits=None, target_act_bits=None,
             threads=1, report=False)
    written = onnx.load(tmp_path / "out.onnx")
    assert interface_of(written) == interface_of(original)
    assert _head_ops(written) == _head_ops(original) == [["Softmax"], ["Flatten"]]
    x = _inputs(original)
    probs, features = _run(written, x)
    assert probs.dtype == np.float16 and features.dtype == np.float16
    np.testing.assert_allclose(probs.astype(np.float32).sum(axis=1), 1.0, atol=5e-3)
    assert load(tmp_path / "out.onnx").head == "Softmax"  # it loads again as a published model would


def test_static_batch_option_fixes_the_restored_outputs_too(tmp_path: Path) -> None:
    original = build(Quirks(softmax=True, two_outputs=True))
    path, plan_path = tmp_path / "m.onnx", tmp_path / "plan.yaml"
    onnx.save(original, path)
    canonical = from_proto(original)
    PrecisionPlan.uniform(find_sites(canonical, (1, 3, 8, 8)), 8, None).save(plan_path)
    from impq_onnx.lowering.lower import lower_file

    lower_file(path, plan_path, tmp_path / "q.onnx", "qonnx", static_batch=1)
    written = interface_of(onnx.load(tmp_path / "q.onnx"))
    assert [o["name"] for o in written["outputs"]] == ["probs", "features"]
    assert [o["shape"][0] for o in (*written["inputs"], *written["outputs"])] == [1, 1, 1]


@pytest.mark.parametrize("format_", target_names())
def test_every_target_keeps_the_interface_and_verifies(format_: str, tmp_path: Path) -> None:
    original = build(Quirks(float16=True, softmax=True, two_outputs=True))
    path, plan_path, out = tmp_path / "m.onnx", tmp_path / "plan.yaml", tmp_path / "q.onnx"
    onnx.save(original, path)
    # onnxruntime's integer kernels (ort): int8 weight codes and 8-bit activations
    plan = mixed_plan(find_sites(from_proto(original), (1, 3, 8, 8)), "symmetric-rms" if format_ == "ort"
                      else "midrise-max", float_kernel=format_ != "ort")
    if format_ == "ort":
        plan.activations = {site: 8 for site in plan.activations}
    plan.save(plan_path)
    data = image_folder(tmp_path / "data", per_class=2)
    runner = CliRunner()
    lowered = runner.invoke(main, ["lower", str(path), "--plan", str(plan_path), "-o", str(out), "--format", format_])
    assert lowered.exit_code == 0, lowered.output
    assert interface_of(onnx.load(out)) == interface_of(original)
    checked = runner.invoke(main, ["verify", str(out), "--model", str(path), "--plan", str(plan_path), "--data",
                                   str(data)])
    assert checked.exit_code == 0, checked.output
