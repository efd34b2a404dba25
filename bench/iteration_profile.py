"""Where one IMPQ iteration's wall time goes: sensitivity, simulation/graph build, sessions, fine-tune
steps, evaluation, checkpoint; on ResNet-20 (CIFAR-10) and on a 224-px MobileNet-V2-size model.

    .venv/bin/python bench/iteration_profile.py --part resnet --data /tmp/cifar10 [--steps 60]
    .venv/bin/python bench/iteration_profile.py --part mobilenet [--steps 4 --sensitivity-samples 32]
    .venv/bin/python bench/iteration_profile.py --data /tmp/cifar10 --markdown bench/results/iteration_profile.md

One weight-lowering iteration runs the code ``compress`` runs (:mod:`impq_onnx.search.impq`: the plan
simulated, the noise gains measured, the least sensitive groups lowered, the guarded fine-tune: the
plan evaluated on the validation split before and after it, the commit to the work dir) with
``compress``'s defaults unless an option says otherwise (threads and replicas from the core count,
frozen batch-norm, the guard; the learning rate is the fixed 0.005, as compress probes its rate once
per run, in its first iteration). The split comes from laps recorded inside
the code path (:func:`impq_onnx.runtime.lap`, a no-op unless recorded): every second of the iteration
lands in exactly one row. A first, unrecorded iteration warms the process (imports, allocator); the
data is decoded once into the work dir's cache before it, as compress does at its start.

Part ``mobilenet``: MobileNet-V2 (width 1.0, 224x224, 2.2 M parameters without the 1000-class
classifier; 10 classes here so that 60 synthetic JPEGs fill every class folder; random weights built in
code) on 256x256 synthetic JPEGs (resized and centre-cropped as ImageNet). Its
fine-tune steps and sensitivity samples are measured on a short budget and the table adds the
iteration extrapolated to compress's defaults (60 steps, 256 sensitivity samples): steps and samples
scale linearly, everything else is fixed per iteration.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESNET = ROOT / "models" / "resnet20-cifar10" / "swa" / "model.onnx"
# (expansion, output channels, repeats, stride) of MobileNet-V2's inverted residual stages
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
ROWS = ("sensitivity: simulation + graph build + sessions", "sensitivity: samples", "sensitivity: pick + plan",
        "fine-tune: simulation + graph build", "fine-tune: training artifacts", "fine-tune: session creation",
        "fine-tune: first batch", "fine-tune: steps", "fine-tune: other", "evaluation: graph + sessions",
        "evaluation: batches", "record", "checkpoint", "other")
_LAP_ROWS = {"simulate": ROWS[0], "sensitivity graph + sessions": ROWS[0], "sensitivity samples": ROWS[1],
             "pick": ROWS[2], "data": ROWS[6], "graph build": ROWS[3], "training artifacts": ROWS[4],
             "session creation": ROWS[5], "fine-tune steps": ROWS[7], "fine-tune other": ROWS[8],
             "evaluation graph + sessions": ROWS[9], "evaluation": ROWS[10], "record": ROWS[11],
             "checkpoint": ROWS[12]}
FIXED = {ROWS[0], ROWS[2], ROWS[3], ROWS[4], ROWS[5], ROWS[6], ROWS[8], ROWS[9], ROWS[11], ROWS[12], ROWS[13]}


def mobilenet_v2(num_classes: int = 1000, seed: int = 0):
    """MobileNet-V2 (Sandler et al. 2018) at 224x224 with random weights; ReLU for ReLU6."""
    from impq_onnx.architectures.layers import NetworkWriter

    net = NetworkWriter(seed)
    x = net.relu("stem.relu", net.batch_norm("stem.bn", net.conv("stem", "input", 3, 32, stride=2), 32))
    channels, index = 32, 0
    for expansion, out, repeats, stride in MOBILENET_V2:
        for r in range(repeats):
            p, hidden, block_in = f"b{index}", channels * expansion, x
            if expansion != 1:
                x = net.relu(f"{p}.expand_relu", net.batch_norm(f"{p}.expand_bn",
                                                                net.conv(f"{p}.expand", x, channels, hidden, kernel=1),
                                                                hidden))
            x = net.conv(f"{p}.dw", x, hidden, hidden, stride=stride if r == 0 else 1, group=hidden)
            x = net.relu(f"{p}.dw_relu", net.batch_norm(f"{p}.dw_bn", x, hidden))
            x = net.batch_norm(f"{p}.project_bn", net.conv(f"{p}.project", x, hidden, out, kernel=1), out)
            if r > 0 and channels == out:
                x = net.add(f"{p}.add", x, block_in)
            channels, index = out, index + 1
    x = net.relu("head.relu", net.batch_norm("head.bn", net.conv("head", x, channels, 1280, kernel=1), 1280))
    x = net.flatten("flatten", net.global_avg_pool("avgpool", x))
    net.gemm("fc", x, 1280, num_classes, output="logits")
    return net.model("mobilenet_v2", "input", ("N", 3, 224, 224), "logits", ("N", num_classes))


def synthetic_images(root: Path, classes: int, per_class: int, size: int = 256) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/test/...``: smooth random colour fields, one JPEG each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)
    return root


def profile_iteration(model_path: str, data: str, work: Path, **options) -> dict[str, float]:
    """Wall seconds per row of ROWS for one weight-lowering iteration (after an unrecorded warm-up one)."""
    from impq_onnx.compress_config import CompressConfig
    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.frontend.canonical import load
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.quant.simulate import simulate
    from impq_onnx.runtime import lap, recording_laps
    from impq_onnx.search.checkpoint import WorkDir
    from impq_onnx.search.impq import _landing, _lower, _reducible, pick_least_sensitive
    from impq_onnx.search.iteration import (
        EVAL_BATCH,
        FIXED_LR,
        derive_seed,
        fine_tune_steps,
        finish_iteration,
        guarded_fine_tune,
        record_iteration,
        with_values,
    )
    from impq_onnx.search.schedule import parse_schedule
    from impq_onnx.search.state import SearchContext, SearchState
    from impq_onnx.sensitivity import noise_gain

    cfg = CompressConfig.resolve(model=model_path, data=data, work_dir=str(work), target_bits=None, **options)
    # the defaults compress resolves when a run starts (batch-norm mode, end-steps factor)
    cfg = cfg.with_derived_defaults()
    base = load(cfg.model)
    model_data = open_model_data(base, cfg.data, cfg.preprocess, val_fraction=cfg.val_fraction, seed=cfg.seed,
                                 max_val_samples=cfg.max_val_samples, cache_dir=work / "decoded")
    train, val = model_data.train, model_data.val
    sites = find_sites(base, (1, *model_data.preprocess.sample_shape))
    workdir = WorkDir(work)
    workdir.start({"bench": "iteration_profile"})
    plan = PrecisionPlan.uniform(sites, None, None, weight_scheme=cfg.weight_scheme, granularity=cfg.granularity)
    for layer in sites.layers:
        plan.weights[layer.node] = [cfg.start_bits] * layer.kernels
    state = SearchState(plan)
    state.phase_started = True
    context = SearchContext(cfg, base, sites, train, val, workdir, {"top1": None, "top5": None, "n": len(val)})

    def iteration() -> None:
        start = time.perf_counter()
        number, phase = state.iteration + 1, "weights"
        model = with_values(base, state.values)
        candidates = _reducible(state.plan, sites, phase, cfg.granularity)
        n = parse_schedule(cfg.schedule).groups(state.phase_step, len(candidates))
        batches = train.batches(EVAL_BATCH, shuffle=True, seed=derive_seed(cfg.seed, number, "sensitivity"))
        simulated = simulate(model, state.plan, sites)
        lap("simulate")
        table = noise_gain(simulated, sites, batches, plan=state.plan, granularity=cfg.granularity,
                           runner_ups=cfg.runner_ups, weighting=cfg.weighting, method=cfg.sensitivity_method,
                           samples=cfg.sensitivity_samples, threads=cfg.threads,
                           seed=derive_seed(cfg.seed, number, "probes"))
        picked = pick_least_sensitive(dict(table.weights), [name for name, _ in candidates], n)
        picked = _landing(state.plan, phase, picked, dict(candidates), sites, cfg.target_bits)
        state.plan = _lower(state.plan, phase, picked, dict(candidates))
        lap("pick")
        # as compress: with the guard (on by default) the plan is evaluated before the fine-tune too;
        # the rate is fixed here (compress probes it once per run, in its first iteration)
        tuned = guarded_fine_tune(context, state, model, fine_tune_steps(cfg, train),
                                  lr=FIXED_LR if cfg.lr is None else cfg.lr)
        state.values = tuned.values
        record = record_iteration(context, state, started=start, phase=phase, kind="lower", trained=tuned.trained,
                                  lowered=len(picked), reducible=len(candidates), extra=tuned.extra,
                                  result=tuned.result)
        lap("record")
        state.phase_step += 1
        finish_iteration(context, state, record, end=lambda: None, early=True, sensitivity=table)
        lap("checkpoint")

    iteration()  # warm-up
    wall = time.perf_counter()
    with recording_laps() as laps:
        iteration()
    wall = time.perf_counter() - wall
    rows = dict.fromkeys(ROWS, 0.0)
    for name, seconds in laps.seconds.items():
        rows[_LAP_ROWS.get(name, "other")] += seconds
    rows["other"] += max(0.0, wall - sum(rows.values()))
    rows["_threads"], rows["_replicas"] = float(cfg.threads), float(cfg.replicas)
    rows["_steps"], rows["_samples"] = float(cfg.steps), float(cfg.sensitivity_samples)
    rows["_batch"] = float(cfg.batch_size)
    return rows


def _table(title: str, rows: dict[str, float], extrapolate: bool) -> str:
    total = sum(rows[r] for r in ROWS)
    fixed = sum(rows[r] for r in ROWS if r in FIXED)
    lines = [f"### {title}", "",
             f"threads {int(rows['_threads'])}, replicas {int(rows['_replicas'])}, batch {int(rows['_batch'])}, "
             f"{int(rows['_steps'])} fine-tune steps, {int(rows['_samples'])} sensitivity samples; "
             f"load average at the end {_load()}", ""]
    head = "| part | seconds | share |"
    sep = "|---|---:|---:|"
    scale_steps, scale_samples = 60 / rows["_steps"], 256 / rows["_samples"]
    if extrapolate:
        head += " at 60 steps, 256 samples (s) | share |"
        sep += "---:|---:|"
        scaled = {r: rows[r] * (scale_steps if r == ROWS[7] else scale_samples if r == ROWS[1] else 1.0)
                  for r in ROWS}
        scaled_total = sum(scaled.values())
    lines += [head, sep]
    for r in ROWS:
        line = f"| {r} | {rows[r]:.2f} | {100 * rows[r] / total:.1f} % |"
        if extrapolate:
            line += f" {scaled[r]:.1f} | {100 * scaled[r] / scaled_total:.1f} % |"
        lines.append(line)
    line = f"| **total** | **{total:.2f}** | 100 % |"
    if extrapolate:
        line += f" **{scaled_total:.1f}** | 100 % |"
    lines.append(line)
    share = 100 * fixed / total
    lines += ["", f"Everything but fine-tune steps, sensitivity samples and evaluation batches: {fixed:.2f} s "
              f"({share:.1f} % of the iteration)"
              + (f"; at 60 steps and 256 samples {100 * sum(scaled[r] for r in FIXED) / scaled_total:.1f} %"
                 if extrapolate else "") + ".", ""]
    return "\n".join(lines)


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("resnet", "mobilenet", "both"), default="both")
    parser.add_argument("--data", help="CIFAR-10 ImageFolder (train/ and test/) for ResNet-20")
    parser.add_argument("--steps", type=int, help="fine-tune steps [resnet: 60, mobilenet: 4]")
    parser.add_argument("--sensitivity-samples", type=int, help="[resnet: 256, mobilenet: 32]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-val-samples", type=int, help="[resnet: 1000, mobilenet: all]")
    parser.add_argument("--limit-train", type=int, default=5000, help="CIFAR training images used (resnet)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--markdown", help="also append the tables to this file")
    args = parser.parse_args()
    parts = ["resnet", "mobilenet"] if args.part == "both" else [args.part]
    if len(parts) > 1:  # each part in its own process
        out = []
        for part in parts:
            command = [sys.executable, __file__, "--part", part]
            for name in ("data", "steps", "sensitivity_samples", "max_val_samples", "threads", "replicas"):
                value = getattr(args, name)
                if value is not None:
                    command += [f"--{name.replace('_', '-')}", str(value)]
            command += ["--batch-size", str(args.batch_size), "--limit-train", str(args.limit_train)]
            out.append(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            print(out[-1], flush=True)
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write("\n".join(out))
        return
    options = {"batch_size": args.batch_size}
    for name in ("threads", "replicas"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    with tempfile.TemporaryDirectory(prefix="impq-profile-") as tmp:
        tmp_path = Path(tmp)
        if parts[0] == "resnet":
            if not args.data:
                parser.error("--data (a CIFAR-10 folder with train/ and test/) is needed for ResNet-20")
            data = _subset(Path(args.data), tmp_path / "cifar", args.limit_train)
            rows = profile_iteration(str(RESNET), str(data), tmp_path / "work", steps=args.steps or 60,
                                     sensitivity_samples=args.sensitivity_samples or 256,
                                     max_val_samples=args.max_val_samples or 1000, **options)
            text = _table("ResNet-20, CIFAR-10 (32x32)", rows, extrapolate=False)
        else:
            import onnx

            model = tmp_path / "mobilenet_v2.onnx"
            onnx.save(mobilenet_v2(num_classes=10), model)
            data = synthetic_images(tmp_path / "images", classes=10, per_class=6)
            rows = profile_iteration(str(model), str(data), tmp_path / "work", steps=args.steps or 4,
                                     sensitivity_samples=args.sensitivity_samples or 32,
                                     max_val_samples=args.max_val_samples, val_fraction=0.25,
                                     # random weights under frozen batch-norm diverge at the default rate;
                                     # the rate does not change the timing
                                     **{"lr": 1e-4, **options})
            text = _table("MobileNet-V2, 224x224, 10 classes, random weights, 60 synthetic JPEGs", rows,
                          extrapolate=True)
    print(text, flush=True)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")


def _subset(source: Path, target: Path, limit: int) -> Path:
    """Links to the first ``limit`` training images (spread over the classes) and the whole test folder."""
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    per_class = max(1, limit // len(classes))
    for name in classes:
        folder = target / "train" / name
        folder.mkdir(parents=True)
        for image in sorted((source / "train" / name).iterdir())[:per_class]:
            os.symlink(image.resolve(), folder / image.name)
    os.symlink((source / "test").resolve(), target / "test")
    return target


if __name__ == "__main__":
    main()
