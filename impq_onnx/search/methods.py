"""The search strategies ``compress --method`` chooses from, in one registry.

Every strategy takes the run's :class:`~impq_onnx.search.state.SearchContext` and
:class:`~impq_onnx.search.state.SearchState`, runs iterations over the same plan, engine and work
directory until the stop decision (:func:`impq_onnx.search.iteration.decide`) ends the run, and returns
the committed state; ``compress`` then writes the same outputs for each. ``compress``'s ``method``
choices are the keys of :data:`METHODS`: a new strategy is one module and one line here.
"""

from __future__ import annotations

from collections.abc import Callable

from impq_onnx.search.density import run_density
from impq_onnx.search.faq import run_faq
from impq_onnx.search.impq import run_search
from impq_onnx.search.ptq import run_ptq
from impq_onnx.search.state import SearchContext, SearchState

__all__ = ["METHODS", "Strategy", "strategy"]

Strategy = Callable[[SearchContext, SearchState], SearchState]

METHODS: dict[str, Strategy] = {
    "impq": run_search,
    "faq": run_faq,
    "activation-density": run_density,
    "uniform-ptq": run_ptq,
}


def strategy(method: str) -> Strategy:
    """The run function of ``method`` (a key of :data:`METHODS`)."""
    return METHODS[method]
