"""The result of a sensitivity measurement: plain frozen data, JSON and CSV views, rankings."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from types import MappingProxyType
from typing import Mapping

__all__ = ["SensitivityTable"]


def _layer_of(group: str) -> str:
    """``"layer3.1.conv1/17"`` -> ``"layer3.1.conv1"`` (a layer or network group is its own layer)."""
    head, sep, tail = group.rpartition("/")
    return head if sep and tail.isdigit() else group


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
    """Sensitivity ``M`` per weight group name and per activation tensor (higher = more sensitive)."""

    weights: Mapping[str, float]
    activations: Mapping[str, float]
    granularity: str
    weighting: str
    method: str
    runner_ups: int
    n_samples: int
    seconds: float
    ties: int = 0  # (sample, runner-up) pairs skipped because their margin was zero

    def __post_init__(self):
        object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))
        object.__setattr__(self, "activations", MappingProxyType(dict(self.activations)))

    def _items(self, kind: str) -> Mapping[str, float]:
        if kind == "weights":
            return self.weights
        if kind == "activations":
            return self.activations
        raise ValueError(f"kind must be 'weights' or 'activations', not {kind!r}")

    def ranked(self, kind: str = "weights", *, descending: bool = True) -> list[tuple[str, float]]:
        """All groups of ``kind`` by sensitivity (ties broken by name, so the order is deterministic)."""
        items = self._items(kind).items()
        return sorted(items, key=lambda kv: ((-kv[1] if descending else kv[1]), kv[0]))

    def most_sensitive(self, k: int, kind: str = "weights", *, per_layer: bool = False):
        """The ``k`` most sensitive groups: a list of ``(name, M)``, or with ``per_layer`` a dict
        ``layer -> [(name, M), ...]`` holding the ``k`` most sensitive groups of each layer."""
        return self._top(k, kind, per_layer, descending=True)

    def least_sensitive(self, k: int, kind: str = "weights", *, per_layer: bool = False):
        """Like :meth:`most_sensitive`, least sensitive first (the groups IMPQ lowers first)."""
        return self._top(k, kind, per_layer, descending=False)

    def _top(self, k: int, kind: str, per_layer: bool, descending: bool):
        ranked = self.ranked(kind, descending=descending)
        if not per_layer:
            return ranked[:k]
        layers: dict[str, list[tuple[str, float]]] = {}
        for name, value in ranked:
            group = layers.setdefault(_layer_of(name) if kind == "weights" else name, [])
            if len(group) < k:
                group.append((name, value))
        return layers

    def to_dict(self) -> dict:
        return {
            "granularity": self.granularity,
            "weighting": self.weighting,
            "method": self.method,
            "runner_ups": self.runner_ups,
            "n_samples": self.n_samples,
            "seconds": self.seconds,
            "ties": self.ties,
            "weights": dict(sorted(self.weights.items())),
            "activations": dict(sorted(self.activations.items())),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "SensitivityTable":
        data = json.loads(text)
        return cls(**data)

    def to_csv(self) -> str:
        """``kind,name,layer,sensitivity`` rows: weights first, then activations, each by name."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["kind", "name", "layer", "sensitivity"])
        for name, value in sorted(self.weights.items()):
            writer.writerow(["weight", name, _layer_of(name), repr(float(value))])
        for name, value in sorted(self.activations.items()):
            writer.writerow(["activation", name, name, repr(float(value))])
        return out.getvalue()

    def finite(self) -> bool:
        return all(math.isfinite(v) for v in list(self.weights.values()) + list(self.activations.values()))
