"""Screen: the first and last layers (conv1, fc) at more bits, paid for elsewhere (issue 23; not built).

IMPQ's ranking leaves ResNet-20's conv1 near 1.5 bits and fc at 1 bit; most QAT work keeps them at 8. This takes a
1.74-bit plan, sets every conv1 and fc kernel to ``bits``, then lowers the other kernels with the smallest M of one
sensitivity table (the paper's 2^-B doubling per bit) until B_w,eff is back at 1.74. ``bench/polish.py`` then
fine-tunes it from float beside the unmodified plan (``bench/results/candidates.md``):

    .venv/bin/python bench/first_last_plan.py 4 /tmp/fl/fl4.plan.yaml
    cp models/resnet20-cifar10/swa/model.onnx /tmp/fl/fl4.float.onnx
    .venv/bin/python bench/polish.py /tmp/fl/fl4 --model models/resnet20-cifar10/swa/model.onnx \\
        --data /tmp/cifar10 --seed 0 --epochs 2 --lr 0.01 --batchnorm train --threads 1
"""

from __future__ import annotations

import heapq
import json
import sys

import impq_onnx
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan

RUN = "bench/runs/resnet20-swa/swa-kernel-174-rms-ep1"
KEPT = ("conv1", "fc")


def main() -> None:
    bits, out = int(sys.argv[1]), sys.argv[2]
    sites = find_sites(impq_onnx.load("models/resnet20-cifar10/swa/model.onnx"), (1, 3, 32, 32))
    plan = PrecisionPlan.load(f"{RUN}.plan.yaml")
    with open(f"{RUN}.work/iterations/0006/sensitivity.json", encoding="utf-8") as f:
        scores = json.load(f)["weights"]
    groups = {g.name: g for g in sites.weight_groups("kernel")}
    for name, group in groups.items():
        if name.split("/")[0] in KEPT:
            plan.set_group_bits(group, bits)
    raised = plan.weight_bits_effective(sites)
    heap = [(scores[n] * 2.0 ** (1 - plan.group_bits(groups[n])), n) for n in groups
            if plan.group_bits(groups[n]) > 1 and n.split("/")[0] not in KEPT]
    heapq.heapify(heap)
    lowered = 0
    while plan.weight_bits_effective(sites) > 1.74 + 1e-9:
        score, name = heapq.heappop(heap)
        plan.set_group_bits(groups[name], plan.group_bits(groups[name]) - 1)
        lowered += 1
        if plan.group_bits(groups[name]) > 1:
            heapq.heappush(heap, (score * 2, name))
    plan.save(out)
    print(f"{out}: conv1/fc at {bits} bits ({raised:.4f}), {lowered} other kernels lowered, "
          f"B_w,eff {plan.weight_bits_effective(sites):.4f}")


if __name__ == "__main__":
    main()
