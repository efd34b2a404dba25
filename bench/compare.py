"""Every compress method at several weight-bit targets, plus onnxruntime's static quantizer, in one table.

    .venv/bin/python bench/compare.py                                   # bundled Fashion-MNIST, budget "small"
    .venv/bin/python bench/compare.py --model models/resnet20-cifar10/model.onnx --data /tmp/cifar10 \\
        --budget medium --bits 4,3,2 --out bench/results/compare-resnet20

Runs, for each ``--bits`` target b:

- ``impq``: ``target_bits=b``, ``target_act_bits=--act-bits`` (start 8 / ``--act-bits``), the budget's
  schedule, steps and ``max_iterations``;
- ``faq``: uniform b-bit weights, ``--act-bits`` activations; its fine-tune total is what IMPQ spent at
  the same b (the sum of IMPQ's ``fine_tune_steps``, rounded up to whole ``steps`` iterations), or
  ``steps × max_iterations`` when IMPQ is not run;
- ``activation-density``: ``B_max,w = clamp(round(b / AD_w), 1, 16)`` with ``AD_w`` the
  parameter-weighted mean output density of the layers on the float model, and
  ``B_max,a = clamp(round(act_bits / AD_a), 1, 8)`` with ``AD_a`` the element-weighted mean site
  density (so B_w,eff lands near b; the 8: QDQ lowering takes at most 8-bit activations below opset
  21); the same fine-tune total as faq;
- ``uniform-ptq``: uniform b / ``--act-bits``, calibration only;

and once ``ort-static``: ``onnxruntime.quantization.quantize_static``, 8-bit per-channel QDQ (QInt8
weights, QUInt8 activations, MinMax calibration on 5 training batches), as an outside reference.

Writes ``<out>.md`` (table), ``<out>.json`` (rows + command + budget) and ``<out>.png`` (top-1 vs
B_w,eff; skipped with a message when matplotlib is missing). top-1 and agreement are on the test
split when ``--data`` has one (else validation); wall time is the whole compress call.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from impq_onnx.compression import CompressConfig, compress
from impq_onnx.data.model_data import ModelData, open_model_data
from impq_onnx.engine import evaluate
from impq_onnx.frontend.canonical import load
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.search.density import activation_densities, output_site
from impq_onnx.search.impq import EVAL_BATCH, labelled_batches

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("impq", "faq", "activation-density", "uniform-ptq", "ort-static")
GRANULARITY = {"faq": "network (uniform)", "activation-density": "layer", "uniform-ptq": "network (uniform)",
               "ort-static": "network (8-bit per-channel QDQ)"}
BUDGETS = {
    "tiny": dict(steps=3, start_steps=6, sensitivity_samples=32, max_val_samples=40, batch_size=16,
                 max_iterations=3),
    "small": dict(steps=20, start_steps=40, sensitivity_samples=128, batch_size=32, max_iterations=14),
    "medium": dict(steps=60, sensitivity_samples=256, batch_size=32, max_iterations=20),
    "full": dict(epochs=1.0, sensitivity_samples=512, batch_size=64, max_iterations=20, augment=True),
}


def budget_options(budget: str) -> dict:
    """A preset name or a YAML file of compress options."""
    if budget in BUDGETS:
        return dict(BUDGETS[budget])
    import yaml

    return dict(yaml.safe_load(Path(budget).read_text()))


def open_as_compress(model: str, data: str, seed: int) -> tuple:
    """``(float model, sites, ModelData)`` as compress opens them with its default options."""
    cfg = CompressConfig.resolve(model=model, data=data, seed=seed)
    base = load(model)
    model_data: ModelData = open_model_data(base, cfg.data, cfg.preprocess, val_fraction=cfg.val_fraction,
                                            seed=cfg.seed, max_val_samples=cfg.max_val_samples)
    return base, find_sites(base, (1, *model_data.preprocess.sample_shape)), model_data


def weighted_density(model: str, data: str, seed: int, threads: int) -> tuple[float, float]:
    """Mean densities on the float model: of the layers' outputs weighted by parameters (classifier: 1),
    and of the activation sites weighted by elements."""
    base, sites, model_data = open_as_compress(model, data, seed)
    train = model_data.train
    dens = activation_densities(base.to_proto(), [s.tensor for s in sites.activations],
                                train.batches(EVAL_BATCH, shuffle=True, seed=seed), max_batches=4, threads=threads)
    num = den = 0.0
    for layer in sites.layers:
        out = output_site(layer, sites)
        num += layer.params * (1.0 if out is None else dens[out.tensor])
        den += layer.params
    act = sum(s.elements * dens[s.tensor] for s in sites.activations) / sum(s.elements for s in sites.activations)
    return num / den, act


def ort_static(model: str, data: str, out: Path, seed: int, threads: int) -> dict:
    """onnxruntime's own 8-bit per-channel QDQ quantizer, evaluated like the compress outputs."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    base, sites, model_data = open_as_compress(model, data, seed)
    train, val, test = model_data.train, model_data.val, model_data.test
    name = base.to_proto().graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([x for _, (x, _y) in zip(range(5), train.batches(32, shuffle=True, seed=seed))])

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {name: x}

    start = time.perf_counter()
    float_path = out.with_suffix(".float.onnx")
    float_path.write_bytes(base.to_bytes())
    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    import onnx

    held = test if test is not None else val
    result = evaluate(onnx.load(str(out)), labelled_batches(held, EVAL_BATCH), float_model=base, threads=threads)
    from impq_onnx.quant.plan import PrecisionPlan

    plan = PrecisionPlan.uniform(sites, 8, 8, default_clip=1.0)
    return {"method": "ort-static", "target_bits": 8, "granularity": GRANULARITY["ort-static"],
            "weight_bits_effective": 8.0, "activation_bits_effective": 8.0, "gbitops": plan.bitops(sites),
            "top1": result.top1, "agreement": result.agreement, "seconds": time.perf_counter() - start,
            "fine_tune_steps": 0, "split": "test" if test is not None else "val", "n": result.n}


def run_method(method: str, model: str, data: str, bits: float, act_bits: float, budget: dict, out: Path,
               **extra) -> dict:
    options = {**budget, "target_bits": bits, "target_act_bits": act_bits, "start_act_bits": int(act_bits),
               **extra}
    start = time.perf_counter()
    result = compress(model, data, output=out, method=method, progress=False, **options)
    seconds = time.perf_counter() - start
    split = "test" if "test_top1" in result.final else "val"
    return {"method": method, "target_bits": bits, "granularity": GRANULARITY.get(method, result.config.granularity),
            "weight_bits_effective": result.final["weight_bits_effective"],
            "activation_bits_effective": result.final["activation_bits_effective"], "gbitops": result.final["gbitops"],
            "top1": result.final[f"{split}_top1"], "agreement": result.final[f"{split}_agreement"],
            "seconds": seconds, "fine_tune_steps": sum(r.fine_tune_steps for r in result.iterations),
            "split": split, "n": result.final.get(f"{split}_n"),
            "float_top1": result.reference.get(f"{split}_top1", result.reference.get("top1")),
            "options": {k: v for k, v in options.items()}}


def markdown(rows: list[dict], header: str) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}"

    lines = [header, "", ("| method | target b | granularity | B_w,eff | B_a,eff | C_C (Gbit-OPs) | top-1 % | "
                          "agreement % | fine-tune steps | wall s |"), "|" + " --- |" * 10]
    for r in rows:
        cells = [r["method"], f"{r['target_bits']:g}", r["granularity"], f"{r['weight_bits_effective']:.2f}",
                 f"{r['activation_bits_effective']:.2f}", f"{r['gbitops']:.4g}", pct(r["top1"]), pct(r["agreement"]),
                 str(r["fine_tune_steps"]), f"{r['seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = next((r["n"] for r in rows if r.get("n")), None)
    p = next((r["float_top1"] for r in rows if r.get("float_top1")), 0.9)
    se = 100 * math.sqrt(p * (1 - p) / n) if n else float("nan")  # binomial standard error of one top-1
    lines += ["", "Notes:", "",
              f"- top-1 and agreement are over {n or '?'} held-out images (one image = {100 / n if n else 0:.2g} "
              f"points), one seed: one top-1 figure has a sampling error of about ±{se:.2g} points (one standard "
              f"error at {100 * p:.0f} %), so differences under about {2 * se:.2g} points are noise.",
              "- faq: weights use the `pow2-std` scheme, FAQ's power-of-two per-layer step "
              "2^ceil(log2(4.12σ/2^(B-1))) exactly; activation steps are FAQ's exactly too "
              "(see `impq_onnx/search/faq.py`).",
              "- activation-density sets activation bits from densities too (B_max,a ≤ 8), so its B_a,eff is "
              "lower than the other methods' (which keep the `--act-bits`).",
              "- fine-tune steps: faq and activation-density get IMPQ's total at the same target (rounded up to "
              "whole iterations); uniform-ptq and ort-static do not fine-tune.",
              "- ort-static: `onnxruntime.quantization.quantize_static`, 8-bit per-channel QDQ, MinMax calibration "
              "on 5 training batches of 32."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        points = sorted((r["weight_bits_effective"], 100 * r["top1"]) for r in rows
                        if r["method"] == method and r["top1"] is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    floats = [r["float_top1"] for r in rows if r.get("float_top1") is not None]
    if floats:
        ax.axhline(100 * floats[0], color="gray", linestyle="--", label="float")
    ax.set_xlabel("B_w,eff (bits)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def header_text(name: str, command: str, budget_name: str, budget: dict, act_bits: float, rows: list[dict]) -> str:
    if not (rows and rows[0].get("float_top1")):
        return f"# compress methods on {name}\n\n`{command}`"
    return (f"# compress methods on {name}\n\n`{command}` (budget `{budget_name}`: {json.dumps(budget)}; "
            f"activations {act_bits:g} bits; top-1/agreement on the {rows[0]['split']} split; float top-1 "
            f"{100 * rows[0]['float_top1']:.1f} %)")


def render(path: Path) -> None:
    """Rewrite ``<stem>.md`` and ``<stem>.png`` from ``<stem>.json`` (no run)."""
    saved = json.loads(path.read_text())
    words = saved["command"].split()

    def flag(name: str, default: str) -> str:  # a JSON from before "name"/"budget_name" were saved
        return words[words.index(name) + 1] if name in words[:-1] else default

    budget_name = saved.get("budget_name") or flag("--budget", "small")
    name = saved.get("name") or Path(flag("--model", "models/fashion-mnist/model.onnx")).parent.name
    header = header_text(name, saved["command"], budget_name, saved["budget"], saved["act_bits"], saved["rows"])
    path.with_suffix(".md").write_text(markdown(saved["rows"], header))
    plot(saved["rows"], path.with_suffix(".png"), f"{name}: top-1 vs B_w,eff")
    print(path.with_suffix(".md").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "fashion-mnist" / "model.onnx"))
    parser.add_argument("--data", default=str(ROOT / "models" / "fashion-mnist"))
    parser.add_argument("--bits", default="4,3,2", help="weight-bit targets, comma-separated")
    parser.add_argument("--act-bits", type=float, default=8.0, help="activation bits of every method")
    parser.add_argument("--budget", default="small", help=f"{', '.join(BUDGETS)} or a YAML file of compress options")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compare-fashion-mnist"))
    parser.add_argument("--work", default=None, help="folder for the runs' outputs [default: a temporary one]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", metavar="JSON", help="only rewrite the table and plot of a finished run's JSON")
    parser.add_argument("--threads", type=int, default=None,
                        help="onnxruntime threads per run [default: the budget's, else 2]; 1 lets two long "
                             "benchmarks share a 2-core machine")
    args = parser.parse_args(argv)
    if args.render:
        render(Path(args.render))
        return 0
    budget = {**budget_options(args.budget), "seed": args.seed}
    if args.threads is not None:
        budget["threads"] = args.threads
    threads = budget.get("threads", 2)
    methods = args.methods.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="impq-compare-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    density = weighted_density(args.model, args.data, args.seed, threads) if "activation-density" in methods else None

    def log(row):
        rows.append(row)
        print(f"{row['method']:<19s} b={row['target_bits']:g} B_w {row['weight_bits_effective']:.2f} "
              f"B_a {row['activation_bits_effective']:.2f} top-1 {row['top1']} agree {row['agreement']} "
              f"{row['seconds']:.1f} s", file=sys.stderr, flush=True)

    for bits in [float(b) for b in args.bits.split(",")]:
        impq_steps = None
        if "impq" in methods:
            row = run_method("impq", args.model, args.data, bits, args.act_bits, budget, work / f"impq-{bits:g}.onnx")
            impq_steps = row["fine_tune_steps"]
            log(row)
        per = budget.get("steps", 60)
        extra = {"max_iterations": max(1, math.ceil(impq_steps / per))} if impq_steps and "epochs" not in budget \
            else {}
        if "faq" in methods:
            log(run_method("faq", args.model, args.data, bits, args.act_bits, budget, work / f"faq-{bits:g}.onnx",
                           **extra))
        if "activation-density" in methods:
            b_max = max(1, min(16, round(bits / density[0])))
            a_max = max(1, min(8, round(args.act_bits / density[1])))  # lowering: <= 8-bit activations below opset 21
            row = run_method("activation-density", args.model, args.data, bits, args.act_bits, budget,
                             work / f"density-{bits:g}.onnx", start_bits=b_max, start_act_bits=a_max, **extra)
            log(row)
        if "uniform-ptq" in methods:
            log(run_method("uniform-ptq", args.model, args.data, bits, args.act_bits, budget,
                           work / f"ptq-{bits:g}.onnx"))
    if "ort-static" in methods:
        log(ort_static(args.model, args.data, work / "ort-static.onnx", args.seed, threads))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    name = Path(args.model).parent.name
    header = header_text(name, command, args.budget, budget, args.act_bits, rows)
    out.with_suffix(".md").write_text(markdown(rows, header))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "name": name, "budget_name": args.budget,
                                                    "budget": budget, "act_bits": args.act_bits,
                                                    "weighted_density": density, "rows": rows}, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"), f"{name}: top-1 vs B_w,eff")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
