"""A one-shot greedy plan from one sensitivity table: does ranking by noise per saved bit beat the paper's M? (issue 23)

From ``--start-plan`` (all kernels at the start bits) and one ``sensitivity.json`` of a compress work dir, lower the
lowest-ranked weight group by one bit, double its score (the paper's 2^-B weighting), and repeat until B_w,eff is
at most ``--target-bits``. ``--rank m`` ranks by the group's M (the paper), ``--rank per-weight`` by M divided by
the group's parameter count (the bits one lowering saves). Writes the plan (with ``--weight-scheme``) to ``out``;
``bench/polish.py`` then fine-tunes it from the float model (name it ``<stem>.plan.yaml`` beside a copy of the
float model as ``<stem>.float.onnx``):

    W=bench/runs/resnet20-swa/swa-kernel-174-rms.work/iterations
    .venv/bin/python bench/greedy_plan.py models/resnet20-cifar10/swa/model.onnx $W/0000/plan.yaml \\
        $W/0001/sensitivity.json /tmp/greedy/per-weight.plan.yaml --rank per-weight
    cp models/resnet20-cifar10/swa/model.onnx /tmp/greedy/per-weight.float.onnx
    .venv/bin/python bench/polish.py /tmp/greedy/per-weight --model models/resnet20-cifar10/swa/model.onnx \\
        --data /tmp/cifar10 --seed 0 --epochs 2 --lr 0.01 --batchnorm train
"""

from __future__ import annotations

import argparse
import heapq
import json

import impq_onnx
from impq_onnx.frontend.site_analysis import find_sites
from impq_onnx.quant.plan import PrecisionPlan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("start_plan")
    parser.add_argument("sensitivity", help="a work dir's iterations/NNNN/sensitivity.json")
    parser.add_argument("out")
    parser.add_argument("--rank", choices=("m", "per-weight"), default="m")
    parser.add_argument("--target-bits", type=float, default=1.74)
    parser.add_argument("--weight-scheme", default="midrise-rms")
    parser.add_argument("--input-shape", default="3,32,32")
    args = parser.parse_args()
    model = impq_onnx.load(args.model)
    sites = find_sites(model, (1, *(int(d) for d in args.input_shape.split(","))))
    with open(args.sensitivity, encoding="utf-8") as f:
        table = json.load(f)
    scores = table["weights"]
    groups = {g.name: g for g in sites.weight_groups(table["granularity"])}
    params = {layer.node: layer.kernel_params for layer in sites.layers}
    size = {name: sum(params[node] for node, _ in g.members) for name, g in groups.items()}
    plan = PrecisionPlan.load(args.start_plan)
    plan.weight_scheme = args.weight_scheme

    def rank(name: str, score: float) -> float:
        return score if args.rank == "m" else score / size[name]

    heap = [(rank(name, scores[name]), name, scores[name]) for name in groups if plan.group_bits(groups[name]) > 1]
    heapq.heapify(heap)
    while heap and plan.weight_bits_effective(sites) > args.target_bits + 1e-9:
        _, name, score = heapq.heappop(heap)
        bits = plan.group_bits(groups[name]) - 1
        plan.set_group_bits(groups[name], bits)
        if bits > 1:
            heapq.heappush(heap, (rank(name, 2 * score), name, 2 * score))
    plan.save(args.out)
    print(f"{args.out}: B_w,eff {plan.weight_bits_effective(sites):.4f} ({args.rank})")


if __name__ == "__main__":
    main()
