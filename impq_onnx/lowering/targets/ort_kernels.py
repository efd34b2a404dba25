"""Which of onnxruntime's x86-64 u8s8 integer kernels a CPU runs, and when they compute exactly the integer sums
:mod:`impq_onnx.lowering.targets.ort_integer` writes out.

onnxruntime's MLAS library multiplies uint8 activation codes by int8 weight codes (QLinearConv, QGemm,
QLinearMatMul) with a kernel chosen from the CPU's features (``onnxruntime/core/mlas/lib/platform.cpp``):

- AVX2 (``MlasGemmU8S8KernelAvx2``, ``MlasConvSymKernelAvx2``) and AVX-512 core without VNNI (``...Avx512Core``,
  used when avx512f/bw/dq/vl are all present) multiply with ``vpmaddubsw``, which adds the two u8·s8 products of
  each adjacent pair of the reduction (K) dimension into an int16 **with saturation** before ``vpmaddwd`` widens
  the pairs to int32 (``x86_64/QgemmU8X8KernelAvx2.S``, ``x86_64/ConvSymKernelAvx2.S``,
  ``amd64/QgemmU8X8KernelAvx512Core.asm``);
- AVX-VNNI (``avx_vnni``, without the AVX-512 core set) and AVX512-VNNI (``avx512_vnni``) use ``vpdpbusds``,
  which sums four products into the int32 accumulator: no int16 step, nothing saturates (AMX, where present,
  takes the GEMMs and sums exactly too).

The products are of the raw codes (the activation zero point is subtracted afterwards through column sums), so a
pair can saturate only where ``x_max · (w_a + w_b)`` leaves int16 for two weight codes of one output channel with
the same sign (``x_max`` the largest activation code, 255 for uint8). Depthwise convolutions widen to int32 before
multiplying (``MlasConvSymDepthwiseKernelAvx2``, ``MlasConvDepthwise``) and cannot saturate. Measured on an AMD
EPYC with AVX2 only (onnxruntime 1.19.2, ``tests/lowering/targets/test_ort_integer.py``): weight codes within
±64 (so ``255 · 128 = 32640``) give the integer reference bit for bit; full-range 8-bit codes do not, and a numpy
model that saturates each adjacent pair of the K order (kernel position outer, input channel inner) reproduces
every deployed output. :func:`pair_overflow` is the bound; it does not depend on the pairing order.
"""

from __future__ import annotations

import numpy as np

from impq_onnx.runtime import cpu_fields

__all__ = ["cpu_flags", "u8s8_kernels", "modelled_cpu", "pair_overflow", "SATURATING", "INT16_MAX"]

INT16_MAX = 32767
_AVX512_CORE = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})
# u8s8_kernels' answers whose products go through vpmaddubsw's saturating int16 pair sums
SATURATING = ("avx2", "avx512core")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first CPU's ``flags`` in ``cpuinfo`` (Linux's /proc/cpuinfo format); None where it cannot be read."""
    line = (cpu_fields(cpuinfo) or {}).get("flags")
    return None if line is None else frozenset(line.split())


def u8s8_kernels(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """Which u8s8 kernels MLAS picks on this CPU, as platform.cpp does: ``"avx512vnni"``, ``"avx512core"``,
    ``"avxvnni"`` or ``"avx2"``; None for a CPU without AVX2 and FMA (SSE kernels, ARM) or unreadable flags,
    whose kernels :mod:`~impq_onnx.lowering.targets.ort_integer` does not model."""
    flags = cpu_flags(cpuinfo)
    if flags is None or not {"avx2", "fma"} <= flags:
        return None
    if _AVX512_CORE <= flags:
        return "avx512vnni" if "avx512_vnni" in flags else "avx512core"
    return "avxvnni" if "avx_vnni" in flags else "avx2"


def modelled_cpu(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU's integer kernels compute what the integer reference writes for every model: x86-64
    whose u8s8 kernels do not saturate (AVX512-VNNI, or AVX-VNNI without AVX-512). On an AVX2 or AVX-512 core CPU
    without VNNI, a model is modelled where :func:`pair_overflow` finds no layer that could saturate."""
    return u8s8_kernels(cpuinfo) in ("avx512vnni", "avxvnni")


def pair_overflow(codes: np.ndarray, x_max: int) -> str | None:
    """Where ``vpmaddubsw`` could saturate for weight ``codes`` (int8, output channel first, any K layout) times
    activation codes up to ``x_max``: the first output channel whose two largest weight codes of one sign reach
    past int16, said in words; None where no pair of products can leave int16, whatever the pairing."""
    w = codes.reshape(len(codes), -1).astype(np.int64)
    for sign, limit in ((1, INT16_MAX), (-1, INT16_MAX + 1)):
        top = np.sort(np.maximum(sign * w, 0), axis=1)[:, -2:]
        reach = x_max * top.sum(axis=1)
        over = np.flatnonzero(reach > limit)
        if over.size:
            c = int(over[0])
            pair = " and ".join(str(sign * int(v)) for v in top[c][::-1])
            return (f"output channel {c}: weight codes {pair} times activation code {x_max} sum to "
                    f"{sign * int(reach[c])}, past int16")
    return None
