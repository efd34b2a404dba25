"""ort target: batch-norm folded, int8 weights, int32 biases, 8-bit activations; exact against the folded simulation."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from lowering_cases import SCHEMES, inputs, midrise, ops, run, tiny
from onnx import numpy_helper
from tiny_models import Quirks, build, weights

from impq_onnx.data import open_dataset
from impq_onnx.data.preprocess import PRESETS
from impq_onnx.errors import PlanError
from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.lowering.lower import lower, read_lowered, read_plan_from_annotation, write
from impq_onnx.lowering.passes import QuantizeActivationsPass, QuantizeWeightsPass
from impq_onnx.lowering.targets.ort import FoldBatchNormPass, QuantizeBiasPass, fold_factors
from impq_onnx.lowering.verify import verify
from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.quant.simulate import calibrate_clips, simulate

BUNDLED = Path(__file__).resolve().parents[3] / "models" / "fashion-mnist"


def _plan(sites, scheme: str, seed: int = 0, top: int = 7) -> PrecisionPlan:
    """Per-kernel weight bits 1..top (both ends present), every activation at 8 bits."""
    plan = PrecisionPlan.uniform(sites, None, 8, weight_scheme=scheme, default_clip=2.5)
    rng = np.random.default_rng(seed)
    for layer in sites.layers:
        bits = [int(b) for b in rng.integers(1, top + 1, layer.kernels)]
        bits[0], bits[-1] = 1, top
        plan.weights[layer.node] = bits
    return plan.validate(sites)


def _fused(proto: onnx.ModelProto, tmp_path: Path) -> collections.Counter:
    """Op counts of the graph onnxruntime runs after its optimizations (where it fuses integer kernels)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ops(onnx.load(tmp_path / "optimized.onnx"))


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_graph_shape_and_exact_against_the_folded_simulation(scheme):
    canonical, sites = tiny(build(Quirks()))
    plan = _plan(sites, scheme, top=7 if midrise(scheme) else 8)
    lowered = lower(canonical, plan, sites, format="ort")
    counts = ops(lowered.proto)
    assert "BatchNormalization" not in counts and "Clip" not in counts and "Add" not in counts
    # one per site, and one lossless copy of fc's in front of GlobalAveragePool -> Flatten (RequantizePass)
    requantized = [n for n in lowered.proto.graph.node if n.name.endswith("/requantize")]
    pools = [n.output[0] for n in lowered.proto.graph.node if n.op_type == "GlobalAveragePool"]
    assert [n.input[0] for n in requantized] == pools and len(pools) == 1
    assert counts["QuantizeLinear"] == len(sites.activations) + 1
    # one per weight, per activation, per requantization and per bias of a layer with quantized input (conv1 and
    # fc; dw has none)
    assert counts["DequantizeLinear"] == len(sites.layers) + len(sites.activations) + 1 + 2
    inits = _inits(lowered.proto)
    for entry in lowered.sidecar["weights"].values():
        assert inits[entry["tensor"]].dtype == np.int8
    consumers = collections.defaultdict(list)
    for node in lowered.proto.graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    for node in lowered.proto.graph.node:
        if node.op_type == "Relu" and node.output[0] in consumers:
            assert "QuantizeLinear" in consumers[node.output[0]] or consumers[node.output[0]] == ["GlobalAveragePool"]
    biases = [n for n in lowered.proto.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in inits and inits[n.input[0]].dtype == np.int32]
    assert len(biases) == 2
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(3)])
    assert result.ok, result.to_dict()
    assert result.max_logit_diff == 0.0
    assert read_plan_from_annotation(lowered.proto) == plan
    assert "bn.scale" in canonical.model.graph.initializers  # the input model is untouched


def test_fold_keeps_codes_and_scales_the_kernel_scale():
    canonical, sites = tiny(build(Quirks()))
    plan = _plan(sites, "symmetric-rms")
    qdq = lower(canonical, plan, sites, format="qdq")
    folded = lower(canonical, plan, sites, format="ort")
    w = weights()
    m, b = fold_factors(w["bn.scale"], w["bn.bias"], w["bn.mean"], w["bn.var"], 1e-5, w["conv1.b"])
    before, after = qdq.sidecar["weights"]["conv1"], folded.sidecar["weights"]["conv1"]
    np.testing.assert_array_equal(_inits(qdq.proto)[before["tensor"]], _inits(folded.proto)[after["tensor"]])
    np.testing.assert_array_equal(np.float32(after["scale"]), (np.float32(before["scale"]) * m).astype(np.float32))
    assert after["scheme_scale"] == before["scale"]
    # the folded model is not the unfolded simulation: folding moves float rounding (and the bias grid)
    x = inputs()
    assert np.max(np.abs(run(folded.proto, x) - run(simulate(canonical, plan, sites), x))) < 0.5


def test_written_files_read_back_and_verify(tmp_path):
    canonical, sites = tiny(build(Quirks(head="matmul")))
    plan = _plan(sites, "pow2-std", seed=1)
    write(lower(canonical, plan, sites, format="ort"), tmp_path / "m.onnx")
    back = read_lowered(tmp_path / "m.onnx")
    assert back.format == "ort"
    result = verify(back, canonical, plan, sites, [inputs()])
    assert result.ok and result.max_logit_diff == 0.0, result.to_dict()
    back.sidecar["weights"]["conv1"]["scale"][0] *= 2  # the unfolded scale would be a wrong record
    assert not verify(back, canonical, plan, sites, [inputs()]).ok


def test_passes_change_nothing_on_a_second_run():
    canonical, sites = tiny(build(Quirks()))
    plan = _plan(sites, "midrise-max")
    model = canonical.model.clone()
    QuantizeWeightsPass(plan, sites)(model)
    QuantizeActivationsPass(plan, sites)(model)
    assert FoldBatchNormPass()(model).modified and QuantizeBiasPass()(model).modified
    proto = ir.serde.serialize_model(model).SerializeToString()
    assert not FoldBatchNormPass()(model).modified and not QuantizeBiasPass()(model).modified
    assert ir.serde.serialize_model(model).SerializeToString() == proto


def test_onnxruntime_fuses_integer_kernels(tmp_path):
    canonical, sites = tiny(build(Quirks()))
    lowered = lower(canonical, _plan(sites, "midrise-max"), sites, format="ort")
    fused = _fused(lowered.proto, tmp_path)
    # conv1 -> Relu -> QuantizeLinear fuses; the depthwise conv's output goes to GlobalAveragePool unquantized
    assert fused["QLinearConv"] == 1 and fused["QGemm"] == 1, fused
    qdq = lower(canonical, _plan(sites, "midrise-max"), sites, format="qdq")
    assert not {"QLinearConv", "QGemm"} & set(_fused(qdq.proto, tmp_path))  # BN blocks it


def test_refuses_what_onnxruntime_cannot_fuse():
    canonical, sites = tiny(build(Quirks()))
    low_activation = _plan(sites, "midrise-max")
    low_activation.activations[sites.activations[1].tensor] = 4
    with pytest.raises(PlanError, match=f"format 'ort': activation '{sites.activations[1].tensor}' has 4 bits"):
        lower(canonical, low_activation, sites, format="ort")
    wide = _plan(sites, "midrise-max", top=8)
    with pytest.raises(PlanError, match="format 'ort': weights of layer 'conv1' need int32 codes"):
        lower(canonical, wide, sites, format="ort")
    mixed = _plan(sites, "symmetric-rms")
    mixed.weights["dwconv"][1] = None
    with pytest.raises(PlanError, match="format 'ort': layer 'dwconv' mixes float and quantized kernels"):
        lower(canonical, mixed, sites, format="ort")


def test_bundled_model_fuses_every_conv_and_equals_its_folded_simulation(tmp_path):
    """Fashion-MNIST: the last Conv's output goes to GlobalAveragePool, so an output quantizer makes it fuse."""
    canonical = load(BUNDLED / "model.onnx")
    sites = find_sites(canonical)
    test = open_dataset(BUNDLED / "test", PRESETS["fashion-mnist"])
    plan = PrecisionPlan.uniform(sites, 4, 8)
    plan = calibrate_clips(canonical.model, plan, sites, test.batches(50), max_batches=2)
    lowered = lower(canonical, plan, sites, format="ort")
    added = [n for n in lowered.proto.graph.node if n.op_type == "QuantizeLinear" and "/requantize" not in n.name]
    assert len(added) == len(sites.activations) + 1 and "relu4.out" in lowered.sidecar["output_quantizers"]
    result = verify(lowered, canonical, plan, sites, test.batches(100))
    assert result.ok and result.samples == 200 and result.max_logit_diff == 0.0, result.to_dict()
    fused = _fused(lowered.proto, tmp_path)
    assert fused["QLinearConv"] == 4 and fused["QGemm"] == 1 and "FusedConv" not in fused and "Conv" not in fused


def _residual_block(slice_pad: bool = False, flip: bool = False) -> onnx.ModelProto:
    """x -> conv1+bn1 -> relu1 (r) -> conv2+bn2 -> Add(r) -> relu2 -> GlobalAveragePool -> Flatten -> Gemm.

    ``slice_pad``: the shortcut is ``r[:, :2] -> Pad`` back to 4 channels (ResNet-20's option A); ``flip``:
    half of bn2's gammas are negative."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    f = lambda *shape, s=0.3: (rng.standard_normal(shape) * s).astype(np.float32)  # noqa: E731
    inits = {"w1": f(4, 3, 3, 3), "w2": f(4, 4, 3, 3), "fc.w": f(5, 4, s=0.5), "fc.b": f(5, s=0.1)}
    nodes = []
    for i, (conv_in, out) in enumerate((("x", "r"), ("r", "c2")), start=1):
        inits.update({f"g{i}": rng.uniform(0.5, 1.5, 4).astype(np.float32), f"b{i}": f(4, s=0.2),
                      f"m{i}": f(4, s=0.1), f"v{i}": rng.uniform(0.5, 1.5, 4).astype(np.float32)})
        nodes.append(helper.make_node("Conv", [conv_in, f"w{i}"], [f"conv{i}.out"], pads=[1, 1, 1, 1], name=f"conv{i}"))
        bn_out = f"bn{i}.out"
        nodes.append(helper.make_node("BatchNormalization", [f"conv{i}.out", f"g{i}", f"b{i}", f"m{i}", f"v{i}"],
                                      [bn_out], name=f"bn{i}"))
        if i == 1:
            nodes.append(helper.make_node("Relu", [bn_out], [out], name="relu1"))
    shortcut = "r"
    if slice_pad:
        inits.update({"starts": np.array([0], np.int64), "ends": np.array([2], np.int64),
                      "axes": np.array([1], np.int64), "pads": np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64)})
        nodes += [helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["narrow"], name="slice"),
                  helper.make_node("Pad", ["narrow", "pads"], ["shortcut"], name="pad")]
        shortcut = "shortcut"
    if flip:
        inits["g2"] = inits["g2"] * np.array([1, -1, 1, -1], np.float32)
    nodes += [helper.make_node("Add", ["bn2.out", shortcut], ["sum"], name="add"),
              helper.make_node("Relu", ["sum"], ["s"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["s"], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["features"], name="flatten"),
              helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "residual",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_residual_add_reads_quantized_inputs_and_both_convs_fuse(tmp_path):
    """conv2 fuses through its output quantizer; the Add, whose output only GlobalAveragePool reads, gets an
    output quantizer with the sum of its inputs' clips, so QLinearAdd and QLinearGlobalAveragePool fuse too."""
    canonical, sites = tiny(_residual_block())
    plan = _plan(sites, "symmetric-rms", top=8)
    lowered = lower(canonical, plan, sites, format="ort")
    producers = {o: n.op_type for n in lowered.proto.graph.node for o in n.output}
    add = next(n for n in lowered.proto.graph.node if n.op_type == "Add")
    assert [producers[i] for i in add.input] == ["DequantizeLinear", "DequantizeLinear"]  # conv2's output quantizer, r
    added = lowered.sidecar["output_quantizers"]
    assert list(added) == ["bn2.out", "s"] and added["bn2.out"]["signed"] and not added["s"]["signed"]
    assert np.float32(added["s"]["clip"]) == np.float32(added["bn2.out"]["clip"] + plan.clips["r"].value)
    assert added["bn2.out"]["dtype"] == "uint8" and added["bn2.out"]["zero_point"] == 128  # signed, as u8 + 128
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(3)])
    assert result.ok and result.max_logit_diff == 0.0, result.to_dict()
    fused = _fused(lowered.proto, tmp_path)
    assert fused["QLinearAdd"] == 1 and fused["QLinearGlobalAveragePool"] == 1, fused
    assert fused["QLinearConv"] == 2 and fused["QGemm"] == 1 and "Conv" not in fused and "FusedConv" not in fused, fused


def test_slice_pad_shortcut_and_negative_gammas_stay_exact_and_fuse(tmp_path):
    """The shortcut's Slice -> Pad gets a lossless requantization, so both inputs of the Add are dequantized
    (it fuses to QLinearAdd where a quantizer reads its output, as in ResNet-20: bench/results/deploy.md); a
    negative batch-norm multiplier flips the kernel's codes, so every folded scale stays positive."""
    canonical, sites = tiny(_residual_block(slice_pad=True, flip=True))
    plan = _plan(sites, "symmetric-rms", top=8)
    qdq = lower(canonical, plan, sites, format="qdq")
    lowered = lower(canonical, plan, sites, format="ort")
    inits = _inits(lowered.proto)
    entry = lowered.sidecar["weights"]["conv2"]
    assert all(s > 0 for s in entry["scale"])
    before, after = _inits(qdq.proto)[qdq.sidecar["weights"]["conv2"]["tensor"]], inits[entry["tensor"]]
    np.testing.assert_array_equal(after, before * np.array([1, -1, 1, -1], np.int8).reshape(-1, 1, 1, 1))
    producers = {o: n for n in lowered.proto.graph.node for o in n.output}
    add = next(n for n in lowered.proto.graph.node if n.op_type == "Add")
    shortcut = producers[add.input[1]]
    assert shortcut.op_type == "DequantizeLinear" and shortcut.name == "shortcut/redequantize"
    assert producers[producers[shortcut.input[0]].input[0]].op_type == "Pad"
    result = verify(lowered, canonical, plan, sites, [inputs(seed=s) for s in range(3)])
    assert result.ok and result.max_logit_diff == 0.0, result.to_dict()
    fused = _fused(lowered.proto, tmp_path)
    assert fused["QLinearConv"] == 2 and "Conv" not in fused, fused
