"""The precision plan: the bits of every weight kernel and activation site, and how to quantize.

A :class:`PrecisionPlan` is plain data keyed by the names a :class:`~impq_onnx.frontend.sites.SiteTable`
uses: layer *node* names for weights (one entry per kernel) and *tensor* names for activations.
It is what the search changes, what simulation and lowering read, and what is saved beside every
checkpoint. Files are YAML or JSON with ``schema_version: 1``; writing is byte-deterministic (keys
sorted, fixed formatting), reading uses the safe loader only.

Bits are ints in 1..16, or ``None`` (written ``null``) for "keep float". For the cost model a float
tensor counts as 32 bits.

Weight schemes (exact definitions in :mod:`impq_onnx.quant.schemes`, one module each; these are built in):
- ``midrise-max`` (the reference code): per kernel, step ``2*max|w_k| / 2^B``, levels
  ``±step/2, ±3*step/2, ...`` (no zero level).
- ``symmetric-rms`` (the paper text): per kernel, zero level, clip ``±4*RMS(w_k)``.
- ``pow2-std`` (FAQ): per layer ``σ_l`` (population std of the layer's weights), per kernel step
  ``2^ceil(log2(4.12*σ_l / 2^(B-1)))``, signed levels ``-2^(B-1) .. 2^(B-1)-1`` (1 bit: ``±step/2``).

Activation scheme ``uniform-clip``: per site one clip ``c``. Unsigned sites (``signed: false``) use
``step = c * 2^-B`` and levels ``0 .. (2^B - 1)*step``; signed sites use ``step = c * 2^-(B-1)`` and
levels ``k*step`` for ``k`` in ``-2^(B-1) .. 2^(B-1) - 1`` (B-bit two's complement). Both have a
straight-through gradient of 1 inside the clip range and 0 outside.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
from typing import Any, Iterable

import yaml

from impq_onnx.config import MAX_INT_DIGITS
from impq_onnx.errors import PlanError, one_line
from impq_onnx.frontend.sites import GRANULARITIES, SiteTable, WeightGroup
from impq_onnx.quant.schemes import weight_scheme

__all__ = [
    "SCHEMA_VERSION",
    "ACTIVATION_SCHEMES",
    "MIN_BITS",
    "MAX_BITS",
    "MIN_CLIP",
    "MAX_CLIP",
    "FLOAT_BITS",
    "ActivationClip",
    "PrecisionPlan",
]

SCHEMA_VERSION = 1
ACTIVATION_SCHEMES = ("uniform-clip",)
MIN_BITS, MAX_BITS = 1, 16
# A clip c, its step c*2^-16 and the Clip bounds must all be normal, finite float32 numbers, or lowering
# stores 0 or inf; this range keeps them so with room to spare (float32 normals: 1.2e-38 .. 3.4e38).
MIN_CLIP, MAX_CLIP = 1e-30, 1e30
FLOAT_BITS = 32  # what an unquantized tensor costs in the metrics



@dataclasses.dataclass(frozen=True)
class ActivationClip:
    """The clip of one activation site: the range is ``[0, value]`` or ``[-value, value]``."""

    value: float | None  # None: not known yet (no batch-norm before it); calibrate before simulating
    signed: bool

    def to_dict(self) -> dict:
        return {"signed": self.signed, "value": self.value}


def _bits_ok(bits: Any) -> bool:
    return bits is None or (isinstance(bits, int) and not isinstance(bits, bool) and MIN_BITS <= bits <= MAX_BITS)


def _cost_bits(bits: int | None) -> int:
    return FLOAT_BITS if bits is None else bits


@dataclasses.dataclass
class PrecisionPlan:
    """Bits per kernel (``weights[node][k]``) and per activation tensor, plus schemes and clips."""

    weights: dict[str, list[int | None]]
    activations: dict[str, int | None]
    clips: dict[str, ActivationClip]
    weight_scheme: str = "midrise-max"
    activation_scheme: str = "uniform-clip"
    granularity: str = "kernel"

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        sites: SiteTable,
        weight_bits: int | None,
        activation_bits: int | None = None,
        *,
        weight_scheme: str = "midrise-max",
        activation_scheme: str = "uniform-clip",
        granularity: str = "kernel",
        default_clip: float | None = None,
    ) -> "PrecisionPlan":
        """Every kernel at ``weight_bits``, every activation site at ``activation_bits``.

        Clips come from the batch-norm before a site (``max_c(beta + 6|gamma|)``); sites without one
        get ``default_clip`` (``None``: calibrate with :func:`impq_onnx.quant.simulate.calibrate_clips`).
        """
        plan = cls(
            weights={layer.node: [weight_bits] * layer.kernels for layer in sites.layers},
            activations={site.tensor: activation_bits for site in sites.activations},
            clips={
                site.tensor: ActivationClip(
                    float(site.batchnorm.clip) if site.batchnorm is not None else default_clip,
                    signed=not site.unsigned,
                )
                for site in sites.activations
            },
            weight_scheme=weight_scheme,
            activation_scheme=activation_scheme,
            granularity=granularity,
        )
        plan.validate(sites)
        return plan

    def copy(self) -> "PrecisionPlan":
        return copy.deepcopy(self)

    def with_clips(self, clips: dict[str, float]) -> "PrecisionPlan":
        """A copy with the clip values of ``clips`` (tensor -> value; signedness kept); ``self`` when empty."""
        if not clips:
            return self
        result = self.copy()
        for tensor, value in clips.items():
            result.clips[tensor] = ActivationClip(float(value), result.clips[tensor].signed)
        return result

    # ---- group access (what the search uses) --------------------------------------------------
    def group_bits(self, group: WeightGroup) -> int | None:
        """The bits of a weight group (its members must agree; the highest wins if they do not)."""
        bits = {self.weights[node][k] for node, k in group.members}
        if None in bits:
            return None
        return max(bits)  # type: ignore[type-var]

    def set_group_bits(self, group: WeightGroup, bits: int | None) -> None:
        if not _bits_ok(bits):
            raise PlanError(f"group '{group.name}': bits must be an int in {MIN_BITS}..{MAX_BITS} or null, not {_brief(bits)}")
        for node, k in group.members:
            self.weights[node][k] = bits

    # ---- checks -------------------------------------------------------------------------------
    def validate(self, sites: SiteTable | None = None) -> "PrecisionPlan":
        """Raise :class:`PlanError` (one line, naming the key) unless the plan fits ``sites``."""
        weight_scheme(self.weight_scheme)  # a PlanError naming the nearest registered scheme
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise PlanError(
                f"activation_scheme {_brief(self.activation_scheme)} is unknown; use one of {', '.join(ACTIVATION_SCHEMES)}"
            )
        if self.granularity not in GRANULARITIES:
            raise PlanError(f"granularity {_brief(self.granularity)} is unknown; use one of {', '.join(GRANULARITIES)}")
        if sites is not None:
            self._validate_against(sites)
        for node, bits in self.weights.items():
            for k, b in enumerate(bits):
                if not _bits_ok(b):
                    raise PlanError(f"weights['{node}'][{k}]: bits must be an int in {MIN_BITS}..{MAX_BITS} or null, not {_brief(b)}")
        for tensor, b in self.activations.items():
            if not _bits_ok(b):
                raise PlanError(f"activations['{tensor}']: bits must be an int in {MIN_BITS}..{MAX_BITS} or null, not {_brief(b)}")
            if tensor not in self.clips:
                raise PlanError(f"activations['{tensor}'] has no entry in clips")
        for tensor, clip in self.clips.items():
            value = clip.value
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise PlanError(f"clips['{tensor}'].value must be a number or null, not {_brief(value)}")
            if value is not None and not (math.isfinite(value) and MIN_CLIP <= value <= MAX_CLIP):
                raise PlanError(
                    f"clips['{tensor}'].value {_brief(value)} must be a finite number in {MIN_CLIP:g}..{MAX_CLIP:g}")
            if not isinstance(clip.signed, bool):
                raise PlanError(f"clips['{tensor}'].signed must be true or false, not {_brief(clip.signed)}")
        return self

    def _validate_against(self, sites: SiteTable) -> None:
        layers = {layer.node: layer for layer in sites.layers}
        tensors = {site.tensor for site in sites.activations}
        for node, bits in self.weights.items():
            if node not in layers:
                raise PlanError(f"weights: layer '{node}' is not a quantizable layer of the model{_nearest(node, layers)}")
            if len(bits) != layers[node].kernels:
                raise PlanError(f"weights['{node}'] lists {len(bits)} kernels, the layer has {layers[node].kernels}")
        for node in layers:
            if node not in self.weights:
                raise PlanError(f"weights: layer '{node}' is missing (use null for float)")
        for tensor in self.activations:
            if tensor not in tensors:
                raise PlanError(f"activations: tensor '{tensor}' is not an activation site{_nearest(tensor, tensors)}")
        for tensor in self.clips:
            if tensor not in tensors:
                raise PlanError(f"clips: tensor '{tensor}' is not an activation site{_nearest(tensor, tensors)}")
        for tensor in tensors:
            if tensor not in self.activations:
                raise PlanError(f"activations: tensor '{tensor}' is missing (use null for float)")

    # ---- metrics (IMPQ-NOTES "Metrics") -------------------------------------------------------
    def weight_bits_effective(self, sites: SiteTable) -> float:
        """``B_w,eff = sum_k B_k |W_k| / sum_k |W_k|`` (float kernels count 32)."""
        num = den = 0
        for layer in sites.layers:
            for b in self.weights[layer.node]:
                num += _cost_bits(b) * layer.kernel_params
                den += layer.kernel_params
        num += 32 * sum(layer.params for layer in sites.float_layers)
        den += sum(layer.params for layer in sites.float_layers)
        return num / den if den else 0.0

    def activation_bits_effective(self, sites: SiteTable) -> float:
        """``B_a,eff`` over activation elements per sample (float sites count 32)."""
        num = den = 0
        for site in sites.activations:
            num += _cost_bits(self.activations[site.tensor]) * site.elements
            den += site.elements
        return num / den if den else 0.0

    def compression_ratio(self, sites: SiteTable) -> float:
        """``CR = 16 / B_w,eff``."""
        return 16.0 / self.weight_bits_effective(sites)

    def weight_bytes(self, sites: SiteTable) -> float:
        """Packed size of all quantized-layer weights in bytes (float kernels at 4 bytes/param)."""
        return sum(
            _cost_bits(b) * layer.kernel_params for layer in sites.layers for b in self.weights[layer.node]
        ) / 8.0 + 4.0 * sum(layer.params for layer in sites.float_layers)

    def bitops(self, sites: SiteTable) -> float:
        """Compute cost C_C (paper eq. 7) in Gbit-OPs per sample.

        ``sum_k N_k (B_w,k B_a,k + B_w,k + B_a,k + log2 M)``: ``N_k`` the MACs of kernel ``k``,
        ``B_a,k`` the bits of its layer's input activation, ``M`` its dot-product length.
        """
        total = 0.0
        for layer in sites.layers:
            b_a = _cost_bits(self.activations.get(layer.activation))
            log_m = math.log2(layer.dot_length) if layer.dot_length > 0 else 0.0
            n_k = layer.macs / layer.kernels
            for b in self.weights[layer.node]:
                b_w = _cost_bits(b)
                total += n_k * (b_w * b_a + b_w + b_a + log_m)
        return total / 1e9

    def summary(self, sites: SiteTable) -> dict[str, float]:
        return {
            "weight_bits_effective": self.weight_bits_effective(sites),
            "activation_bits_effective": self.activation_bits_effective(sites),
            "compression_ratio": self.compression_ratio(sites),
            "weight_bytes": self.weight_bytes(sites),
            "gbitops": self.bitops(sites),
        }

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "weight_scheme": self.weight_scheme,
            "activation_scheme": self.activation_scheme,
            "granularity": self.granularity,
            "weights": {k: list(self.weights[k]) for k in sorted(self.weights)},
            "activations": {k: self.activations[k] for k in sorted(self.activations)},
            "clips": {k: self.clips[k].to_dict() for k in sorted(self.clips)},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "PrecisionPlan":
        if not isinstance(data, dict):
            raise PlanError(f"{source}: a plan must be a mapping, not {type(data).__name__}")
        known = {"schema_version", "weight_scheme", "activation_scheme", "granularity", "weights", "activations", "clips"}
        for key in data:
            if key not in known:
                raise PlanError(f"{source}: unknown key '{key}'{_nearest(str(key), known)}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(f"{source}: schema_version must be {SCHEMA_VERSION}, not {_brief(version)}")
        for key in ("weights", "activations", "clips"):
            if not isinstance(data.get(key, {}), dict):
                raise PlanError(f"{source}: '{key}' must be a mapping")
        weights = {}
        for node, bits in data.get("weights", {}).items():
            if not isinstance(bits, list):
                raise PlanError(f"{source}: weights['{node}'] must be a list of per-kernel bits")
            weights[str(node)] = list(bits)
        clips = {}
        for tensor, clip in data.get("clips", {}).items():
            if not isinstance(clip, dict) or set(clip) - {"value", "signed"} or not isinstance(clip.get("signed", False), bool):
                raise PlanError(f"{source}: clips['{tensor}'] must be {{value: <float|null>, signed: <bool>}}")
            value = clip.get("value")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise PlanError(f"{source}: clips['{tensor}'].value must be a number or null, not {_brief(value)}")
            try:
                number = None if value is None else float(value)
            except OverflowError as exc:  # an int past a float's range: 1e309 written out
                raise PlanError(f"{source}: clips['{tensor}'].value {_brief(value)} is too large for a clip") from exc
            clips[str(tensor)] = ActivationClip(number, bool(clip.get("signed", False)))
        plan = cls(
            weights=weights,
            activations={str(k): v for k, v in data.get("activations", {}).items()},
            clips=clips,
            weight_scheme=data.get("weight_scheme", "midrise-max"),
            activation_scheme=data.get("activation_scheme", "uniform-clip"),
            granularity=data.get("granularity", "kernel"),
        )
        try:
            return plan.validate()
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from exc

    def to_json(self) -> str:
        return _json_dump(self.to_dict()) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> "PrecisionPlan":
        def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            data = dict(pairs)
            if len(data) < len(pairs):
                seen: set[str] = set()
                for key, _ in pairs:
                    if key in seen:
                        raise PlanError(f"{source}: the key {key[:80]!r} is given twice in one object; keep one")
                    seen.add(key)
            return data

        def whole(digits: str) -> int:
            if len(digits.lstrip("-")) > MAX_INT_DIGITS:
                raise PlanError(f"{source}: a number of {len(digits)} digits; write one of at most {MAX_INT_DIGITS}")
            return int(digits)

        try:
            data = json.loads(text, object_pairs_hook=unique, parse_int=whole)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
        except ValueError as exc:  # a float literal json cannot convert; ints stop at whole() above
            raise PlanError(f"{source}: a number json cannot read ({one_line(exc, 80)})") from exc
        except RecursionError as exc:
            raise PlanError(f"{source}: the plan is nested too deeply to be a plan") from exc
        return cls.from_dict(data, source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True, default_flow_style=None, width=100, allow_unicode=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "plan") -> "PrecisionPlan":
        from impq_onnx.config import parse_yaml  # alias bombs, deep nesting, duplicate keys, huge integers

        return cls.from_dict(parse_yaml(text, source, "plan", PlanError), source)

    def save(self, path) -> None:
        path = str(path)
        text = self.to_json() if path.endswith(".json") else self.to_yaml()
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    @classmethod
    def load_for(cls, path, sites: SiteTable) -> "PrecisionPlan":
        """:meth:`load`, then :meth:`validate` against the model's ``sites``: an error names the plan file."""
        plan = cls.load(path)
        try:
            return plan.validate(sites)
        except PlanError as exc:
            from impq_onnx.files import shown

            raise PlanError(f"{shown(path)}: {exc}") from exc

    @classmethod
    def load(cls, path) -> "PrecisionPlan":
        from impq_onnx.files import MiB, read_input, shown

        path = str(path)
        try:
            text = read_input(path, 64 * MiB, "plan", PlanError).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanError(f"{shown(path)}: the plan is not UTF-8 text (offset {exc.start}); is it the right "
                            "file?") from exc
        return cls.from_json(text, shown(path)) if path.endswith(".json") else cls.from_yaml(text, shown(path))


def _json_dump(value: Any, indent: int = 0) -> str:
    """Sorted keys, one key per line, lists of scalars on one line: diffable and deterministic."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}{json.dumps(str(k))}: {_json_dump(value[k], indent + 1)}" for k in sorted(value)]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_json_dump(v, indent + 1) for v in value) + "]"
    return json.dumps(value)


def _brief(value: Any) -> str:
    """``repr(value)`` cut to one short line: a plan's value in an error may be any YAML (a long list, an alias
    expanded many times)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _nearest(name: str, choices: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
