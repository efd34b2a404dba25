"""The output-target registry: what ``--format`` chooses, as one object per format.

A :class:`Target` takes the QDQ-lowered graph (integer weight codes + DequantizeLinear, activations as
``[Clip] -> QuantizeLinear -> DequantizeLinear``) and rewrites it into the format it writes; for
:mod:`impq_onnx.lowering.verify` it also says how to run the written model back with standard ops and
where its weight scales and activation ranges are kept. :func:`register` adds one; ``lower``, ``verify``,
``read_lowered``, the ``compress`` options and the CLI choice all read the registry, so a new format is
one module, one ``register`` line (in :mod:`impq_onnx.lowering.targets`) and its tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Protocol

import numpy as np
import onnx
import onnx_ir as ir

from impq_onnx.errors import ConfigError
from impq_onnx.lowering.naming import weight_names

if TYPE_CHECKING:
    from impq_onnx.frontend.sites import QuantLayer, SiteTable
    from impq_onnx.quant.plan import PrecisionPlan

__all__ = ["Target", "Lowered", "Array", "TARGETS", "register", "unregister", "get_target", "target_names", "target_help",
           "planned_layer"]

Array = Callable[[str], np.ndarray]  # initializer name -> its values, in the written model


class Lowered(Protocol):
    """What a target reads of a lowered model (:class:`impq_onnx.lowering.lower.LoweredModel`)."""

    proto: onnx.ModelProto
    sidecar: dict  # {} for a model converted without a plan
    format: str
    attachments: dict[str, dict | bytes]


class Target:
    """One output format. Subclasses set the class attributes and override what differs from QDQ."""

    name: ClassVar[str] = ""  # the --format value
    help: ClassVar[str] = ""  # one line for --help
    stores_codes: ClassVar[bool] = True  # weights stay integer tensors (else on-grid float values)
    attachments: ClassVar[tuple[str, ...]] = ()  # JSON files beside the model: output path with this suffix
    binary_attachments: ClassVar[tuple[str, ...]] = ()  # those of them that are bytes, not JSON

    def rewrite(self, model: ir.Model, plan: PrecisionPlan | None, sites: SiteTable | None,
                **options: object) -> dict[str, dict | bytes]:
        """Rewrite the QDQ graph ``model`` in place into this format; returns ``{suffix: JSON or bytes}`` attachments.

        ``plan`` and ``sites`` are None for a QDQ model made by another tool: then only the graph is known.
        """
        return {}

    def options_of(self, lowered: Lowered) -> dict[str, object]:
        """The target options (``rewrite``'s keywords) a written ``lowered`` was made with, read back from it,
        so that verify can lower again exactly as the file was lowered."""
        return {}

    def quantizer_graph(self, lowered: Lowered) -> onnx.ModelProto:
        """The graph in which verify reads every quantizer's codes, scales and zero points: the model itself,
        unless the target keeps codes outside it (packed)."""
        return lowered.proto

    def finish_sidecar(self, sidecar: dict, model: ir.Model) -> None:
        """Update the sidecar of the rewritten ``model`` where the rewrite changed recorded values (scales)."""

    def finish_model(self, proto: onnx.ModelProto) -> None:
        """Last edits of the serialized model, after the annotation (what the written file leaves out)."""

    def reference(self, canonical: object, plan: PrecisionPlan, sites: SiteTable, lowered: Lowered) -> onnx.ModelProto:
        """The model ``verify`` compares ``lowered`` with: by default the simulation of the plan."""
        from impq_onnx.quant.simulate import simulate

        return simulate(canonical, plan, sites)

    def as_standard_ops(self, lowered: Lowered) -> onnx.ModelProto:
        """A model with standard ops only that computes what ``lowered`` means (run by verify)."""
        return lowered.proto

    def deployed_reference(self, model: onnx.ModelProto) -> onnx.ModelProto | None:
        """What onnxruntime computes for the standard-op ``model`` with all graph optimizations on, in
        standard ops exact to the bit (None: the target promises nothing there). verify compares the two."""
        return None

    def weight_scales(self, lowered: Lowered, entry: dict, array: Array) -> np.ndarray:
        """The per-kernel scales of the sidecar weight ``entry`` as the written files keep them."""
        return array(weight_names(entry["source"])["scale"]).reshape(-1)

    def activation_range(self, lowered: Lowered, site: str, entry: dict,
                         array: Array) -> tuple[int, int, float] | None:
        """``(lo, hi, scale)`` the written files let activation ``site`` take (None: no quantizer found)."""
        raise NotImplementedError


TARGETS: dict[str, Target] = {}  # by name, in registration order; read it live, do not copy


def register(target: Target) -> Target:
    if not target.name or target.name in TARGETS:
        raise ValueError(f"output target {target.name!r}: no name, or the name is registered already")
    TARGETS[target.name] = target
    return target


def unregister(name: str) -> None:
    TARGETS.pop(name, None)


def get_target(name: str) -> Target:
    target = TARGETS.get(name)
    if target is None:
        raise ConfigError(f"format {name!r} is unknown; use one of {', '.join(TARGETS)}")
    return target


def target_names() -> tuple[str, ...]:
    return tuple(TARGETS)


def target_help() -> str:
    return "; ".join(f"{t.name}: {t.help}" for t in TARGETS.values()) + "."


def planned_layer(sites: SiteTable | None, node: ir.Node) -> QuantLayer | None:
    """The site-table layer of ``node`` (None without a site table, or for a layer the plan does not cover)."""
    if sites is None:
        return None
    return next((layer for layer in sites.layers if layer.node == node.name), None)
