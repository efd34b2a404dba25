"""Fine-tune throughput of ResNet-20 (CIFAR shapes) on onnxruntime-training: float and simulated 4-bit.

    .venv/bin/python bench/train_throughput.py [--batch 128] [--threads 2] [--steps 12] [--profile DIR]
                                               [--replicas 1 2]

Random images (throughput does not depend on the values). The first ``--warmup`` steps are not
timed. With ``--profile`` the onnxruntime profile of each training session is written to DIR and
summarised by op type. If ``import torch`` works, the same network is timed in torch for comparison
(torch is never needed otherwise); ``--torch-python PY`` runs that part in another interpreter that has
torch (``python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy``), and
``--torch-only`` runs just that part. Each onnxruntime configuration is printed with its ratio to torch.
``--replicas R1 R2 ...`` times each configuration with each replica count (``fine_tune(replicas=R)``: the
batch split in R parts trained concurrently, ``threads // R`` threads each), the counts interleaved run
by run so that a change of machine load hits them alike, and prints each rate's ratio to the first count's.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import subprocess
import time

import numpy as np


def _batches(count: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    data = [(rng.standard_normal((batch, 3, 32, 32)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int64))
            for _ in range(count)]
    return lambda: iter(data)


def _profile_summary(prefix: str, top: int = 12) -> list[str]:
    files = sorted(glob.glob(prefix + "*.json"))
    if not files:
        return [f"  (no profile written under {prefix})"]
    events = json.load(open(files[-1]))
    by_op: dict[str, float] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            by_op[event.get("args", {}).get("op_name", "?")] += event.get("dur", 0)
    total = sum(by_op.values()) or 1
    lines = [f"  kernel time by op ({files[-1]}):"]
    for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"    {op:28s} {us / 1e3:9.1f} ms  {100 * us / total:5.1f} %")
    return lines


def _torch_throughput(batch: int, threads: int, steps: int, warmup: int, weight_bits: int | None = None,
                      act_bits: int | None = None) -> float | None:
    """Images/s of the same training step in torch; ``weight_bits``, ``act_bits``: fake-quantized the way the
    IMPQ reference code (torch) simulates them (``../shared/IMPQ-NOTES.md``): weights per output channel
    mid-rise with step ``2 max|w_k| / 2^B`` recomputed every step, activations (every conv's and the
    classifier's input) clipped and rounded to ``2^B`` levels, straight-through gradients."""
    try:
        import torch
        import torch.nn as nn
    except Exception:  # torch is optional here and absent from the tool's dependencies
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def act(x, signed: bool, clip: float = 3.0):
        bits = act_bits
        if bits is None:
            return x
        y = torch.clamp(x, -clip if signed else 0.0, clip)
        step = clip * 2.0 ** -(bits - 1 if signed else bits)
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        return y + (torch.clamp(torch.round(y / step), lo, hi) * step - y).detach()

    def weight(w):
        bits = weight_bits
        if bits is None:
            return w
        step = (w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) * 2.0 ** (1 - bits)).clamp_min(1e-30)
        r = torch.clamp(torch.round(w / step - 0.5), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return w + ((r + 0.5) * step - w).detach()

    class Conv(nn.Conv2d):
        signed = False

        def forward(self, x):
            return self._conv_forward(act(x, self.signed), weight(self.weight), self.bias)

    class Linear(nn.Linear):
        def forward(self, x):
            return nn.functional.linear(act(x, False), weight(self.weight), self.bias)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.c1, self.b1 = Conv(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = Conv(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.short = (nn.Sequential(Conv(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                          if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.b1(self.c1(x)))
            return torch.relu(self.b2(self.c2(y)) + self.short(x))

    stem = Conv(3, 16, 3, 1, 1, bias=False)
    stem.signed = True  # the image input
    layers, cin = [stem, nn.BatchNorm2d(16), nn.ReLU()], 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    net.train()
    for step in range(steps):
        if step == warmup:
            start = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return batch * (steps - warmup) / (time.perf_counter() - start)


def _torch_reference(args, weight_bits: int | None, act_bits: int | None) -> float | None:
    """One torch run's rate, here or (``--torch-python``) in a subprocess."""
    if args.torch_python is None:
        return _torch_throughput(args.batch, args.threads, args.steps, args.warmup, weight_bits, act_bits)
    command = [args.torch_python, os.path.abspath(__file__), "--torch-only", "--batch", str(args.batch), "--threads",
               str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", "1"]
    command += ["--torch-weight-bits", str(weight_bits)] if weight_bits else []
    command += ["--torch-act-bits", str(act_bits)] if act_bits else []
    out = subprocess.run(command, capture_output=True, text=True)
    words = out.stdout.split()
    if out.returncode != 0 or "img/s" not in words:
        print(f"torch reference failed in {args.torch_python}: {(out.stderr or out.stdout).strip()[-300:]}")
        return None
    return float(words[words.index("img/s") - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the best is shown "
                        "(a shared machine's load only ever slows a run down)")
    parser.add_argument("--profile", default=None, help="directory for onnxruntime profiles")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1], help="replica counts to time, each against "
                        "the first (e.g. 1 2) [default: 1]")
    parser.add_argument("--torch-python", default=None, help="interpreter with torch for the reference run "
                        "[default: this one, when it can import torch]")
    parser.add_argument("--torch-only", action="store_true", help="time only the torch reference (any interpreter "
                        "with torch and numpy; impq_onnx is not imported)")
    parser.add_argument("--torch-weight-bits", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--torch-act-bits", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(r < 1 for r in args.replicas):
        parser.error("--replicas counts must be at least 1")
    if args.optimizer != "sgd" and any(r > 1 for r in args.replicas):
        parser.error("--replicas above 1 needs --optimizer sgd")
    if args.torch_only:
        rate = max(_torch_throughput(args.batch, args.threads, args.steps, args.warmup, args.torch_weight_bits,
                                     args.torch_act_bits) or 0.0 for _ in range(args.repeats))
        print(f"{'torch':36s} {rate:8.1f} img/s" if rate else "torch: not importable")
        return

    from impq_onnx.architectures import resnet20
    from impq_onnx.engine import fine_tune
    from impq_onnx.frontend.canonical import from_proto
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.quant.plan import PrecisionPlan

    canonical = from_proto(resnet20())
    sites = find_sites(canonical, (1, 3, 32, 32))
    w4 = PrecisionPlan.uniform(sites, 4, None)
    w4a4 = PrecisionPlan.uniform(sites, 4, 4, default_clip=3.0)  # the input has no batch-norm: fixed clip
    # (label, plan, torch's weight and activation bits): torch runs the same simulation in the same run
    configs = [("float", None, None, None), ("w4 (weights 4-bit)", w4, 4, None),
               ("w4a4 (weights+activations 4-bit)", w4a4, 4, 4)]
    batches = _batches(4, args.batch)
    print(f"ResNet-20, batch {args.batch}, {args.threads} threads, {args.steps} steps "
          f"({args.warmup} untimed), optimizer {args.optimizer}"
          + ("" if args.replicas == [1] else f", replicas {' '.join(map(str, args.replicas))}")
          + "; torch (SGD momentum) runs the same configuration, interleaved with onnxruntime's runs")
    for label, plan, weight_bits, act_bits in configs:
        prefixes = {}
        for replicas in args.replicas:
            prefixes[replicas] = None
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
                name = label.split()[0] + ("" if args.replicas == [1] else f"-R{replicas}")
                prefixes[replicas] = os.path.abspath(os.path.join(args.profile, name))
        runs: dict[int, list] = {r: [] for r in args.replicas}
        torch_rates: list[float | None] = []
        for _ in range(args.repeats):
            torch_rates.append(_torch_reference(args, weight_bits, act_bits))
            for replicas in args.replicas:  # interleaved: a change of load hits every count alike
                trained = fine_tune(canonical, plan, sites, batches, steps=args.steps, lr=0.01,
                                    optimizer=args.optimizer, threads=args.threads, progress=False,
                                    profile=prefixes[replicas], replicas=replicas)
                timed = trained.step_seconds[args.warmup:]
                runs[replicas].append((args.batch * len(timed) / sum(timed), np.median(timed)))
        torch_rate = None if None in torch_rates else max(torch_rates)
        print(f"{'torch ' + label:40s} " + ("not available, ratios skipped" if torch_rate is None
                                             else f"{torch_rate:8.1f} img/s"))
        base = max(runs[args.replicas[0]])[0]
        for replicas in args.replicas:
            rate, median = max(runs[replicas])
            ratio = "" if torch_rate is None else f"  {rate / torch_rate:.2f}x torch"
            if args.replicas != [1]:
                ratio += f"  {rate / base:.2f}x R={args.replicas[0]}"
            name = label if args.replicas == [1] else f"{label} R={replicas}"
            print(f"{name:40s} {rate:8.1f} img/s  ({1e3 * median:.0f} ms/step median){ratio}")
            if prefixes[replicas]:
                print("\n".join(_profile_summary(prefixes[replicas])))


if __name__ == "__main__":
    main()
