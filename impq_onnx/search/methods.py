"""The search strategies ``compress --method`` chooses from, in one table.

Every strategy has the signature of :func:`impq_onnx.search.impq.run_search`: it runs iterations over
the same plan, engine and work directory until a stop rule fires and returns the committed state;
``compress`` then writes the same outputs for each.
"""

from __future__ import annotations

from impq_onnx.search.density import run_density
from impq_onnx.search.faq import run_faq
from impq_onnx.search.impq import run_search
from impq_onnx.search.ptq import run_ptq

__all__ = ["METHODS", "strategy"]

METHODS = {
    "impq": run_search,
    "faq": run_faq,
    "activation-density": run_density,
    "uniform-ptq": run_ptq,
}


def strategy(method: str):
    """The run function of ``method`` (a key of :data:`METHODS`)."""
    return METHODS[method]
