"""The report page: one self-contained HTML file (figures embedded as base64 PNG, no scripts, no
outside links), byte-deterministic for the same runs (no timestamps, fixed ordering)."""

from __future__ import annotations

import base64
import html
import json
import math

from impq_onnx.events import lowering_text
from impq_onnx.report.run_data import RunData

__all__ = ["environment_rows", "layer_rows", "render_html", "summary_rows"]

_STYLE = """
body { font-family: DejaVu Sans, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.85em; color: #555; }
p.missing { color: #a33; } details { margin: 0.5em 0 1em; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100.0 * value:.2f} %"


def _points(reference, value) -> str:
    """How far ``value`` is below ``reference`` (fractions), in percentage points."""
    return "n/a" if reference is None or value is None else f"{100.0 * (reference - value):.2f} pp"


def _size(n_bytes) -> str:
    if n_bytes is None:
        return "n/a"
    return f"{n_bytes / 1024:.1f} KiB" if n_bytes < 1024 * 1024 else f"{n_bytes / 1024 / 1024:.2f} MiB"


def summary_rows(run: RunData) -> list[tuple[str, str]]:
    """(quantity, value) rows of the run's final metrics, as printed in the summary table."""
    final = run.final
    split = "test" if final.get("test_top1") is not None or "test_agreement" in final else "val"
    return [
        ("iteration", str(final.get("iteration"))),
        ("stop reason", run.stop_reason or "not finished (last committed iteration shown)"),
        ("B_w,eff [bit]", _num(final.get("weight_bits_effective"))),
        ("B_a,eff [bit]", _num(final.get("activation_bits_effective"))),
        ("C_C [Gbit-OPs / image]", _num(final.get("gbitops"), 4)),
        ("CR (vs 16-bit weights)", _num(final.get("compression_ratio"), 2, "x")),
        ("quantized weights", _size(final.get("weight_bytes"))),
        ("model size", _size(final.get("model_bytes"))),
        (f"{split} top-1", _pct(final.get(f"{split}_top1"))),
        (f"{split} top-1 of the float model", _pct(run.reference.get("top1" if split == "val" else "test_top1"))),
        (f"{split} top-1 drop vs float", _points(run.reference.get("top1" if split == "val" else "test_top1"),
                                                  final.get(f"{split}_top1"))),
        (f"{split} agreement with float", _pct(final.get(f"{split}_agreement"))),
        ("validation top-1", _pct(final.get("val_top1"))) if split == "test" else None,
        ("wall time (search)", _num(final.get("elapsed"), 1, " s")),
        ("refit", _refit_text(run.refit)) if run.refit else None,
    ]


def _refit_text(refit: dict) -> str:
    """The refit block (compress --refit-epochs) in words: what ran, and whether the output is its model."""
    if "diverged" in refit:
        return f"{refit['epochs']:g} epochs from float diverged ({refit['diverged']}); the search's model is written"
    verdict = "written" if refit.get("kept") else "not kept, the search's model is written"
    average = refit.get("average")
    averaged = "" if not average else (
        f" (the last {average['epochs']} epochs averaged: {_pct(average.get('val_agreement'))} against the last "
        f"weights' {_pct(average.get('last_val_agreement'))}, " + ("used)" if average.get("used") else "not used)"))
    return (f"{refit['epochs']:g} epochs from float on iteration {refit['from_iteration']}'s plan, "
            f"{_num(refit.get('seconds'), 1, ' s')}: validation agreement {_pct(refit.get('val_agreement'))}{averaged}"
            f" vs the search's {_pct(refit.get('search_val_agreement'))}, {verdict}")


_FLOAT_BITS = 32  # a float kernel's bits in the share of weight bits, as in B_w,eff


def layer_rows(run: RunData) -> list[list[str]]:
    """One row per quantized layer: layer, op, kernels, weight bits mean/min/max, input activation bits,
    weights (parameters), share of all the layers' weight bits (a float kernel counts 32 bits)."""
    def bits_of(layer) -> int | None:
        if layer.kernel_params is None:
            return None
        return sum((_FLOAT_BITS if b is None else b) * layer.kernel_params for b in layer.kernel_bits)

    known = [bits_of(layer) for layer in run.layers]
    total = sum(b for b in known if b is not None) if all(b is not None for b in known) else None
    rows = []
    for layer, layer_bits in zip(run.layers, known):
        bits = [b for b in layer.kernel_bits if b is not None]
        floats = len(layer.kernel_bits) - len(bits)
        mean = _num(sum(bits) / len(bits), 2) if bits else "float"
        low = str(min(bits)) if bits else "float"
        high = str(max(bits)) if bits else "float"
        if bits and floats:
            mean += f" ({floats} float)"
        params = None if layer.kernel_params is None else layer.kernel_params * len(layer.kernel_bits)
        act = "n/a" if layer.activation is None else ("float" if layer.activation_bits is None
                                                       else str(layer.activation_bits))
        share = "n/a" if total is None or layer_bits is None or not total else f"{100.0 * layer_bits / total:.1f} %"
        rows.append([layer.node, layer.op_type or "n/a", str(len(layer.kernel_bits)), mean, low, high, act,
                     "n/a" if params is None else str(params), share])
    return rows


def environment_rows(run: RunData) -> list[list[str]] | None:
    """(what, value) rows of the versions and command line compress recorded; None when it did not."""
    env = run.environment
    if not env:
        return None
    names = {"impq_onnx": "impq-onnx", "onnx": "onnx", "onnxruntime": "onnxruntime", "numpy": "numpy",
             "python": "Python", "command": "command line"}
    rows = [[names[key], "not installed" if env.get(key) is None else str(env[key])] for key in names if key in env]
    rows += [[key, str(value)] for key, value in env.items() if key not in names]
    return rows


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    def row(cells, tag):
        classes = [' class="text"' if i < text_columns else "" for i in range(len(cells))]
        return "<tr>" + "".join(f"<{tag}{k}>{_e(c)}</{tag}>" for k, c in zip(classes, cells)) + "</tr>"

    return "<table>\n" + row(header, "th") + "\n" + "\n".join(row(r, "td") for r in rows) + "\n</table>"


def _iterations_table(run: RunData) -> str:
    rows = [[str(r.iteration), r.phase, r.kind if r.kind == "start" else
             lowering_text(r.lowered, r.reducible), _num(r.weight_bits_effective),
             _num(r.activation_bits_effective), _num(r.gbitops, 4), _num(r.compression_ratio, 2, "x"),
             _pct(r.val_top1), _drop(run, r.val_top1), _pct(r.val_agreement), _num(r.seconds, 1, " s"),
             " ".join(x for x in (r.extra.get("fine_tune_kept") is False and "fine-tune dropped (guard)",
                                  r.phase_end and f"phase end: {r.phase_end}",
                                  r.stop and f"stop: {r.stop}") if x)]
            for r in run.records]
    return _table(["iter", "phase", "step", "B_w,eff", "B_a,eff", "C_C", "CR", "val top-1", "drop vs float",
                   "agreement", "time", "note"], rows, text_columns=3)


def _drop(run: RunData, top1) -> str:
    return _points(run.reference.get("top1"), top1)


def _figure(data: bytes, alt: str, caption: str, file_name: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<figure>\n<img alt="{_e(alt)}" src="data:image/png;base64,{encoded}">\n'
            f"<figcaption>{_e(caption)} ({_e(file_name)})</figcaption>\n</figure>")


def _config_table(config: dict) -> str:
    rows = [[key, json.dumps(config[key]) if not isinstance(config[key], str) else config[key]]
            for key in config]
    return _table(["option", "value"], rows, text_columns=2)


def _run_section(run: RunData, figures: dict[str, tuple[bytes, str, str] | None], heading: bool) -> str:
    parts = [f"<h2>{_e(run.label)}</h2>" if heading else "",
             f"<p>work dir <code>{_e(run.path)}</code>, {_e(run.granularity)} granularity, "
             f"{len(run.records)} iterations"
             + (f", compress report <code>{_e(run.report_path.name)}</code>" if run.report_path else
                ", no compress report beside it (validation metrics only)") + ".</p>",
             "<h3>Summary</h3>",
             _table(["quantity", "value"], [list(r) for r in summary_rows(run) if r is not None])]
    if run.verification is not None:
        v = run.verification
        parts.append(f"<p>verification of the lowered model: {'OK' if v.get('ok') else 'FAILED'} over "
                     f"{_e(v.get('samples'))} images, agreement with the simulation {_e(_pct(v.get('agreement')))}, "
                     f"max logit difference {_e(v.get('max_logit_diff'))}.</p>")
    for name, entry in figures.items():
        if entry is not None:
            data, caption, file_name = entry
            parts.append(_figure(data, f"{run.label}: {name}", caption, file_name))
        elif name == "sensitivity":
            parts.append('<p class="missing">Sensitivity per layer: not recorded (the work dir has no '
                         "iterations/NNNN/sensitivity.json).</p>")
    parts += ["<h3>Layers</h3>",
              _table(["layer", "op", "kernels", "weight bits mean", "min", "max", "activation bits", "weights",
                      "share of weight bits"], layer_rows(run), text_columns=2),
              "<p>Bits of the final plan; activation bits are those of the layer's input; share: the layer's "
              "weights times their bits over all layers' (a float kernel counts 32 bits). Op and weights are "
              "read from the input model (n/a when it is no longer there).</p>"]
    parts += ["<h3>Iterations</h3>", _iterations_table(run),
              "<details><summary>Resolved config</summary>", _config_table(run.config), "</details>"]
    environment = environment_rows(run)
    parts += ["<h3>Environment</h3>",
              _table(["what", "value"], environment, text_columns=2) if environment else
              '<p class="missing">Versions and command line: unknown (no compress report beside the work '
              "dir, or one written by an older impq-onnx).</p>"]
    return "\n".join(p for p in parts if p)


def render_html(runs: list[RunData], run_figures: list[dict], comparison: tuple[bytes, str, str] | None) -> str:
    """The page: a comparison table and Fig. 4 for several runs, then one section per run."""
    several = len(runs) > 1
    title = "IMPQ report: " + ", ".join(run.label for run in runs)
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{_e(title)}</title>",
             f"<style>{_STYLE}</style>", "</head>", "<body>", f"<h1>{_e(title)}</h1>"]
    if several:
        rows = []
        for run in runs:
            values = dict(r for r in summary_rows(run) if r is not None)
            top1 = next((v for k, v in values.items() if k.endswith("top-1") and "float" not in k), "n/a")
            rows.append([run.label, run.granularity, values["B_w,eff [bit]"], values["B_a,eff [bit]"],
                         values["C_C [Gbit-OPs / image]"], values["CR (vs 16-bit weights)"], values["model size"],
                         top1, values["wall time (search)"]])
        parts += ["<h2>Runs</h2>", _table(["run", "granularity", "B_w,eff", "B_a,eff", "C_C [Gbit-OPs]", "CR",
                                           "size", "top-1", "wall time"], rows, text_columns=2)]
        if comparison is not None:
            parts.append(_figure(comparison[0], "compression ratio vs accuracy", comparison[1], comparison[2]))
    for run, figures in zip(runs, run_figures):
        parts.append(_run_section(run, figures, heading=several))
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"
