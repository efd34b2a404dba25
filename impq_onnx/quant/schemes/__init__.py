"""The weight quantization schemes, one module each, by name (see :mod:`.base` for what a scheme owns).

Adding a scheme: a :class:`WeightScheme` subclass in a new module here, one :func:`register` line below,
and its tests. Plans, ``--weight-scheme``, simulation, lowering, verification and sensitivity read the
registry, so nothing else changes.
"""

from __future__ import annotations

from impq_onnx.quant.schemes.base import SCHEMES, Grid, WeightScheme, register, scheme_names, weight_scheme
from impq_onnx.quant.schemes.midrise_max import MidriseMax
from impq_onnx.quant.schemes.midrise_rms import MidriseRms
from impq_onnx.quant.schemes.pow2_std import Pow2Std
from impq_onnx.quant.schemes.symmetric_rms import SymmetricRms

__all__ = ["Grid", "WeightScheme", "SCHEMES", "register", "weight_scheme", "scheme_names", "help_text"]

register(MidriseMax())
register(SymmetricRms())
register(Pow2Std())
register(MidriseRms())


def help_text() -> str:
    """``a (x), b (y) or c (z)``: the registered schemes with their summaries, for option help."""
    names = [f"{s.name} ({s.summary})" for s in SCHEMES.values()]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
