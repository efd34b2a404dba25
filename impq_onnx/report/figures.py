"""The report's figures as PNG bytes: the paper's Fig. 3, 4 and 5, sensitivity and kernel-bit histogram.

Rendering is off-screen (the Agg canvas directly, no pyplot, so no backend is chosen or changed for
the caller) under matplotlib's default style with fixed sizes and DPI, and the PNGs carry no
``Software`` or time metadata: the same run gives the same bytes.
"""

from __future__ import annotations

import io
import math

import matplotlib
import matplotlib.style
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from impq_onnx.report.run_data import RunData, _natural_key

__all__ = ["FIGURES", "accuracy_drop", "accuracy_vs_bits", "bits_per_layer", "compression_vs_accuracy",
           "has_accuracy", "kernel_bits_histogram", "kernel_sensitivity", "sensitivity_per_layer"]

DPI = 100
_RC = {
    "font.family": "DejaVu Sans",  # bundled with matplotlib: the same glyphs on every machine
    "font.size": 9,
    "axes.titlesize": 10,
    "svg.hashsalt": "impq-onnx",
    "path.simplify": False,
}
_WEIGHT, _ACT, _REF = "#1f77b4", "#ff7f0e", "#7f7f7f"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _figure(width: float, height: float, draw) -> bytes:
    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        draw(fig)
        return _png(fig)


def _pct(value):
    return math.nan if value is None else 100.0 * value


def has_accuracy(run: RunData) -> bool:
    return any(r.val_top1 is not None for r in run.records)


def _accuracy_key(run: RunData) -> tuple[str, str]:
    """(record key, axis label): top-1 when the data are labelled, else agreement with the float model."""
    if has_accuracy(run):
        return "val_top1", "validation top-1 [%]"
    return "val_agreement", "agreement with float [%]"


# ---- Fig. 5: bits per layer ----------------------------------------------------------------------
def bits_per_layer(run: RunData) -> bytes:
    layers = run.layers
    names = [layer.node for layer in layers] + [name for name, _ in run.unpaired_activations]
    width = min(16.0, max(6.0, 0.45 * len(names) + 2.0))

    def draw(fig):
        ax = fig.subplots()
        xs = list(range(len(names)))
        means, lows, highs, acts = [], [], [], []
        for layer in layers:
            bits = [b for b in layer.kernel_bits if b is not None]
            mean = sum(bits) / len(bits) if bits else math.nan
            means.append(mean)
            lows.append(mean - min(bits) if bits else 0.0)
            highs.append(max(bits) - mean if bits else 0.0)
            acts.append(math.nan if layer.activation_bits is None else layer.activation_bits)
        means += [math.nan] * len(run.unpaired_activations)
        lows += [0.0] * len(run.unpaired_activations)
        highs += [0.0] * len(run.unpaired_activations)
        acts += [math.nan if b is None else b for _, b in run.unpaired_activations]
        ax.bar([x - 0.2 for x in xs], means, 0.4, color=_WEIGHT, label="weights: mean kernel bits (bar: min-max)",
               yerr=[lows, highs], capsize=3, ecolor="black", error_kw={"linewidth": 0.8})
        ax.bar([x + 0.2 for x in xs], acts, 0.4, color=_ACT, label="input activation bits")
        top = max([b for b in means + acts if not math.isnan(b)] + [1.0])
        for x, (mean, act) in enumerate(zip(means, acts)):
            for dx, value in ((-0.2, mean), (0.2, act)):
                if math.isnan(value):
                    ax.text(x + dx, 0.15, "float", rotation=90, ha="center", va="bottom", fontsize=7, color=_REF)
        ax.set_xticks(xs, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
        ax.set_ylim(0, top + 2.5)
        ax.set_ylabel("bits")
        ax.set_title(f"{run.label}: bits per layer after IMPQ (iteration {run.final.get('iteration')}, "
                     f"{run.granularity} granularity)")
        ax.legend(loc="upper right", fontsize=8, ncols=2)
        ax.grid(axis="y", alpha=0.3)

    return _figure(width, 4.0, draw)


# ---- Fig. 3: accuracy vs effective bits ----------------------------------------------------------
def accuracy_vs_bits(run: RunData) -> bytes:
    key, label = _accuracy_key(run)
    phases = [p for p in ("weights", "activations") if any(r.phase == p for r in run.records)]
    # Other methods (faq, activation-density, uniform-ptq) have their own phase names: plot them
    # against the weight bits in one panel.
    grouped = bool(phases)
    phases = phases or ["weights"]

    def draw(fig):
        # One y-range for both panels (sharey): the phases are compared side by side.
        axes = fig.subplots(1, len(phases), squeeze=False, sharey=True)[0]
        for ax, phase in zip(axes, phases):
            records = [r for r in run.records if r.phase == phase or not grouped]
            bits_key = "weight_bits_effective" if phase == "weights" else "activation_bits_effective"
            xs = [getattr(r, bits_key) for r in records]
            ax.plot(xs, [_pct(getattr(r, key)) for r in records], "o-", color=_WEIGHT, label=label.split(" [")[0])
            if key == "val_top1":
                ax.plot(xs, [_pct(r.val_agreement) for r in records], "s--", color=_ACT, markersize=4,
                        label="agreement with float")
            for x, r in zip(xs, records):
                ax.annotate(str(r.iteration), (x, _pct(getattr(r, key))), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7)
            reference = run.reference.get("top1") if key == "val_top1" else 1.0
            if reference is not None:
                ax.axhline(_pct(reference), color=_REF, linestyle=":", linewidth=1, label="float model")
            ax.invert_xaxis()  # iterations lower the bits: time runs left to right
            ax.set_xlabel("$B_{w,\\mathrm{eff}}$ [bit]" if phase == "weights" else "$B_{a,\\mathrm{eff}}$ [bit]")
            if ax is axes[0]:
                ax.set_ylabel(label)
            else:
                ax.tick_params(labelleft=True)  # sharey hides them; the same numbers, easier to read
            ax.set_title(f"{phase} phase (numbers: iterations)")
            ax.grid(alpha=0.3)
            ax.legend(loc="best", fontsize=8)
        fig.suptitle(f"{run.label}: accuracy vs effective precision over IMPQ iterations")

    return _figure(5.0 * len(phases) + 1.0, 4.0, draw)


# ---- accuracy drop vs the float model over the iterations ----------------------------------------
def accuracy_drop(run: RunData) -> bytes:
    """Percentage points below the float model per iteration: top-1 (labelled data) and agreement."""
    records = list(run.records)
    xs = [r.iteration for r in records]
    reference = run.reference.get("top1")

    def draw(fig):
        ax = fig.subplots()
        if has_accuracy(run) and reference is not None:
            ax.plot(xs, [_pct(reference) - _pct(r.val_top1) for r in records], "o-", color=_WEIGHT,
                    label="top-1 drop: float top-1 - iteration top-1")
        ax.plot(xs, [100.0 - _pct(r.val_agreement) for r in records], "s--", color=_ACT, markersize=4,
                label="disagreement with float: 100 % - agreement")
        ax.axhline(0.0, color=_REF, linestyle=":", linewidth=1, label="float model")
        starts = [r.iteration for r, before in zip(records[1:], records) if r.phase != before.phase]
        for start in starts:
            ax.axvline(start - 0.5, color="black", linestyle="--", linewidth=0.8)
            ax.annotate(f"{records[xs.index(start)].phase} phase", (start - 0.5, 1.0),
                        xycoords=("data", "axes fraction"), xytext=(3, -12), textcoords="offset points", fontsize=7)
        if len(xs) <= 30:  # every iteration labelled; longer runs keep matplotlib's integer ticks
            ax.set_xticks(xs, [str(x) for x in xs])
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("iteration")
        ax.set_ylabel("drop vs float model [percentage points]")
        ax.set_title(f"{run.label}: accuracy drop vs the float model over IMPQ iterations (validation)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)

    return _figure(min(16.0, max(7.0, 0.3 * len(xs) + 3.0)), 3.5, draw)


# ---- Fig. 4: compression ratio vs accuracy per granularity ---------------------------------------
def compression_vs_accuracy(runs: list[RunData]) -> bytes:
    labelled = all(has_accuracy(run) for run in runs)
    key, label = ("val_top1", "validation top-1 [%]") if labelled else ("val_agreement", "agreement with float [%]")
    markers = {"kernel": "o", "layer": "s", "network": "^"}

    def draw(fig):
        ax = fig.subplots()
        for run in runs:
            records = [r for r in run.records if r.phase == "weights"] or list(run.records)
            ax.plot([r.compression_ratio for r in records], [_pct(getattr(r, key)) for r in records],
                    marker=markers.get(run.granularity, "D"), label=f"{run.label} ({run.granularity})")
        references = {run.reference.get("top1") for run in runs} if labelled else {1.0}
        for reference in sorted(r for r in references if r is not None):
            ax.axhline(_pct(reference), color=_REF, linestyle=":", linewidth=1)
        ax.set_xlabel("compression ratio CR = 16 / $B_{w,\\mathrm{eff}}$")
        ax.set_ylabel(label)
        ax.set_title("accuracy vs compression ratio per granularity (dotted: float model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return _figure(7.0, 4.5, draw)


# ---- sensitivity per layer -----------------------------------------------------------------------
def _layer_of(group: str, granularity: str) -> str:
    head, sep, tail = group.rpartition("/")
    return head if granularity == "kernel" and sep and tail.isdigit() else group


def kernel_sensitivity(run: RunData) -> dict[str, tuple[float, float, float]]:
    """``{layer: (mean, min, max)}`` of the weight sensitivity M per kernel, in network order.

    A kernel-granularity table gives one M per kernel; a layer (network) group's M is a sum over
    its kernels' weights, so it is divided by the group's kernel count (min = max = mean). Summing
    over kernels instead would rank layers by their kernel count, not by how sensitive a kernel is.
    """
    table = run.sensitivity or {}
    granularity = table.get("granularity", run.granularity)
    kernels = {layer.node: len(layer.kernel_bits) for layer in run.layers}
    per_kernel: dict[str, list[float]] = {}
    for name, value in (table.get("weights") or {}).items():
        layer = _layer_of(name, granularity)
        if granularity == "kernel":
            per_kernel.setdefault(layer, []).append(value)
        else:
            count = kernels.get(layer) or (sum(kernels.values()) if name == "network" else 0) or 1
            per_kernel.setdefault(layer, []).append(value / count)
    order = [layer.node for layer in run.layers]
    names = [n for n in order if n in per_kernel] + sorted((n for n in per_kernel if n not in order),
                                                           key=_natural_key)
    return {n: (sum(per_kernel[n]) / len(per_kernel[n]), min(per_kernel[n]), max(per_kernel[n])) for n in names}


def sensitivity_per_layer(run: RunData) -> bytes:
    """Mean M per kernel of each layer (bars from the least to the most sensitive kernel), and each
    activation site's M (log scale)."""
    table = run.sensitivity or {}
    granularity = table.get("granularity", run.granularity)
    weights = kernel_sensitivity(run)
    names = list(weights)
    order = [layer.node for layer in run.layers]
    by_act = {layer.activation: layer.node for layer in run.layers if layer.activation}
    acts = dict(table.get("activations") or {})
    act_names = sorted(acts, key=lambda a: (order.index(by_act[a]) if a in by_act else len(order), _natural_key(a)))
    weight_title = ("weights: mean M per kernel (bar: min-max)" if granularity == "kernel" else
                    f"weights: {granularity} M / kernels")

    def draw(fig):
        left, right = fig.subplots(1, 2, width_ratios=[max(1, len(names)), max(1, len(act_names))])
        for ax, labels, values, color, title in (
                (left, names, [weights[n] for n in names], _WEIGHT, weight_title),
                (right, [f"{a}\n({by_act[a]})" if a in by_act else a for a in act_names],
                 [(acts[a], acts[a], acts[a]) for a in act_names], _ACT, "activations: M per site")):
            positive = [(m, lo, hi) if m > 0 and math.isfinite(m) else (math.nan, math.nan, math.nan)
                        for m, lo, hi in values]
            means = [m for m, _, _ in positive]
            spread = [[m - lo if lo > 0 else 0.0 for m, lo, _ in positive], [hi - m for m, _, hi in positive]]
            ranged = any(lo != hi for _, lo, hi in positive if not math.isnan(lo))
            ax.bar(range(len(labels)), means, color=color, yerr=spread if ranged else None, capsize=3,
                   ecolor="black", error_kw={"linewidth": 0.8})
            if any(not math.isnan(v) for v in means):
                ax.set_yscale("log")
            ax.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 4 else 0,
                          ha="right" if len(labels) > 4 else "center", fontsize=7)
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        left.set_ylabel(f"M ({table.get('weighting', 'paper')} weighting; higher: more sensitive)")
        fig.suptitle(f"{run.label}: noise-gain sensitivity measured in iteration {run.sensitivity_iteration}")

    return _figure(min(16.0, max(7.0, 0.5 * (len(names) + len(act_names)) + 3.0)), 4.0, draw)


# ---- histogram of kernel bits --------------------------------------------------------------------
def kernel_bits_histogram(run: RunData) -> bytes:
    counts: dict[int | None, int] = {}
    for layer in run.layers:
        for bits in layer.kernel_bits:
            counts[bits] = counts.get(bits, 0) + 1
    numeric = sorted(b for b in counts if b is not None)
    labels = [str(b) for b in range(min(numeric, default=1), max(numeric, default=1) + 1)]
    values = [counts.get(int(b), 0) for b in labels]
    if None in counts:
        labels.append("float")
        values.append(counts[None])
    total = sum(values)

    def draw(fig):
        ax = fig.subplots()
        bars = ax.bar(range(len(labels)), values, color=_WEIGHT)
        for bar, value in zip(bars, values):
            if value:
                ax.annotate(f"{value} ({100.0 * value / total:.0f}%)", (bar.get_x() + bar.get_width() / 2, value),
                            textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_ylim(0, max(values + [1]) * 1.15)
        ax.set_xlabel("kernel bits")
        ax.set_ylabel("kernels")
        ax.set_title(f"{run.label}: kernel bits in the final plan ({total} kernels, "
                     f"B_w,eff {run.final.get('weight_bits_effective', math.nan):.3f})")
        ax.grid(axis="y", alpha=0.3)

    return _figure(6.0, 3.5, draw)


# name -> (function of one run, caption), in page order
FIGURES = {
    "bits_per_layer": (bits_per_layer, ("Weight bits (mean of the kernels of each layer, bars from the smallest to "
                                        "the largest kernel) and input activation bits per layer, as the paper's "
                                        "Fig. 5.")),
    "accuracy_vs_bits": (accuracy_vs_bits, ("Accuracy and agreement with the float model at the end of each "
                                            "iteration vs the effective precision, as the paper's Fig. 3; both "
                                            "panels share one y-axis range.")),
    "accuracy_drop": (accuracy_drop, ("Accuracy drop at the end of each iteration: the float model's validation "
                                      "top-1 minus the iteration's, in percentage points (when the data are "
                                      "labelled), and the share of validation images whose class differs from "
                                      "the float model's (100 % - agreement). Dashed: a new phase begins.")),
    "sensitivity": (sensitivity_per_layer, ("Noise-gain sensitivity (IMPQ eq. 4-5) of the last measurement. "
                                            "Weights: the mean M per kernel of each layer, so layers rank by how "
                                            "sensitive one kernel is, not by how many kernels they have (bars: "
                                            "least to most sensitive kernel; a layer or network group's M is "
                                            "divided by its kernel count). Activations: M per site. Log "
                                            "scale.")),
    "kernel_bits": (kernel_bits_histogram, "How many kernels have each bit width in the final plan."),
}
