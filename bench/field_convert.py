"""The field bench's EfficientNet-Lite0: its legacy torch ``.pth`` (a zip-less pickle with storages) read
without torch, and the network written as ONNX from that state dict (used by ``bench/field.py``)."""

from __future__ import annotations

import collections
import pickle
import struct
from typing import Any

import numpy as np

__all__ = ["efficientnet_lite0_onnx", "load_legacy_state_dict"]


class _Storage:
    def __init__(self, name: str) -> None:
        self.name = name


def _rebuild(storage: Any, offset: int, size: Any, stride: Any, *rest: Any) -> tuple:
    return (storage, offset, tuple(size), tuple(stride))


class _LegacyUnpickler(pickle.Unpickler):
    """torch's pre-1.6 serialisation, reading only tensors and dicts (any other class is refused)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild
        if module == "torch" and name in ("FloatStorage", "LongStorage"):
            return _Storage(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a state dict")

    def persistent_load(self, pid: Any) -> tuple:
        return (pid[1].name, pid[2], pid[4])


def load_legacy_state_dict(data: bytes) -> dict[str, np.ndarray]:
    import io

    f = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, sys info
        _LegacyUnpickler(f).load()
    obj = _LegacyUnpickler(f).load()
    keys = _LegacyUnpickler(f).load()
    kinds = {t[0][1]: (t[0][2], "<f4" if t[0][0] == "FloatStorage" else "<i8") for t in obj.values()}
    raw = {}
    for key in keys:
        (n,) = struct.unpack("<q", f.read(8))
        count, dtype = kinds[key]
        assert n == count, (key, n, count)
        dt = np.dtype(dtype)
        raw[key] = np.frombuffer(f.read(dt.itemsize * n), dtype=dt)
    out = {}
    for name, ((_, key, _n), offset, size, stride) in obj.items():
        a = raw[key]
        out[name] = np.lib.stride_tricks.as_strided(a[offset:], shape=size,
                                                    strides=[a.itemsize * s for s in stride]).copy()
    return out


# efficientnet_lite_pytorch/utils.py efficientnet_lite(): stages r1_k3_s11 r2_k3_s22 r2_k5_s22 r3_k3_s22 r3_k5_s11
# r4_k5_s22 r1_k3_s11 (lite0: width and depth 1.0); the first block of a stage has the stride.
_LITE0_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def efficientnet_lite0_onnx(state: dict[str, np.ndarray], size: int = 224) -> bytes:
    """The package's EfficientNet-Lite0 as ONNX: Conv2dStaticSamePadding (TF 'SAME' for ``size``) as Conv pads,
    BatchNorm eps 1e-3, ReLU6 as Clip(0, 6), AdaptiveAvgPool + Linear head; NCHW, dynamic batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    names = iter(range(10**6))

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    const("relu6_min", np.array(0.0)), const("relu6_max", np.array(6.0))

    def conv(x: str, prefix: str, hw: int, stride: int = 1, groups: int = 1) -> tuple[str, int]:
        w = state[prefix + ".weight"]
        k = w.shape[-1]
        out = -(-hw // stride)
        pad = max((out - 1) * stride + k - hw, 0)
        y = f"{prefix}.out"
        nodes.append(helper.make_node("Conv", [x, const(prefix + ".weight", w)], [y], name=prefix,
                                      kernel_shape=[k, k], strides=[stride, stride], group=groups,
                                      pads=[pad // 2, pad // 2, pad - pad // 2, pad - pad // 2]))
        return y, out

    def bn(x: str, prefix: str) -> str:
        y = f"{prefix}.out"
        nodes.append(helper.make_node("BatchNormalization", [x] + [const(f"{prefix}.{p}", state[f"{prefix}.{p}"])
                                      for p in ("weight", "bias", "running_mean", "running_var")], [y],
                                      name=prefix, epsilon=1e-3))
        return y

    def relu6(x: str) -> str:
        y = f"relu6_{next(names)}"
        nodes.append(helper.make_node("Clip", [x, "relu6_min", "relu6_max"], [y], name=y))
        return y

    x, hw = conv("input", "_conv_stem", size, 2)
    x = relu6(bn(x, "_bn0"))
    for i, stride in enumerate(_LITE0_STRIDES):
        p = f"_blocks.{i}"
        inp = x
        if p + "._expand_conv.weight" in state:
            x = relu6(bn(conv(x, p + "._expand_conv", hw)[0], p + "._bn0"))
        channels = state[p + "._depthwise_conv.weight"].shape[0]
        x, hw = conv(x, p + "._depthwise_conv", hw, stride, groups=channels)
        x = relu6(bn(x, p + "._bn1"))
        x = bn(conv(x, p + "._project_conv", hw)[0], p + "._bn2")
        w_in = state[(p + "._expand_conv.weight") if p + "._expand_conv.weight" in state
                     else (p + "._depthwise_conv.weight")].shape[1 if p + "._expand_conv.weight" in state else 0]
        if stride == 1 and w_in == state[p + "._project_conv.weight"].shape[0]:
            y = f"{p}.add"
            nodes.append(helper.make_node("Add", [x, inp], [y], name=y))
            x = y
    x = relu6(bn(conv(x, "_conv_head", hw)[0], "_bn1"))
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"))
    nodes.append(helper.make_node("Gemm", ["features", const("_fc.weight", state["_fc.weight"]),
                                           const("_fc.bias", state["_fc.bias"])], ["logits"], name="_fc", transB=1))
    graph = helper.make_graph(nodes, "efficientnet_lite0", [
        helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="bench/field.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


