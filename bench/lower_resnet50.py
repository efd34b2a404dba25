"""Benchmark: lowering a ResNet-50-size model (built in code, random weights) must take < 10 s and
< 3x the model's size in extra memory (peak RSS during ``lower()`` minus RSS before it).

    python bench/lower_resnet50.py [--scheme midrise-max|symmetric-rms] [--max-bits 8] [--format qdq]

The model: ResNet-50 v1 (bottlenecks [3, 4, 6, 3], unfolded batch-norm, 1000 classes, 224x224),
~25.6 M parameters. The plan: per-kernel bits drawn from 1..max-bits, activations 4..8 bits.
RSS is sampled every millisecond by a thread (``/proc/self/statm``) after ``malloc_trim(0)`` released
the heap freed while building and loading the model; ``ru_maxrss`` growth is printed too.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import threading
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    def __init__(self):
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the baseline RSS is what is live, not what was."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resnet50(classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride=1, name=""):
        w = (rng.standard_normal((cout, cin, k, k), dtype=np.float32) * np.float32(np.sqrt(2.0 / (cin * k * k))))
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [f"{name}.c"], name=name, kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        for p, v in (("scale", rng.uniform(0.5, 1.5, cout)), ("bias", rng.normal(0, 0.1, cout)),
                     ("mean", rng.normal(0, 0.1, cout)), ("var", rng.uniform(0.5, 1.5, cout))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{name}.bn.{p}"))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.c"] + [f"{name}.bn.{p}" for p in
                                      ("scale", "bias", "mean", "var")], [f"{name}.b"], name=f"{name}.bn"))
        return f"{name}.b"

    def relu(x, name):
        nodes.append(helper.make_node("Relu", [x], [f"{name}.r"], name=f"{name}.relu"))
        return f"{name}.r"

    x = relu(conv("image", 3, 64, 7, 2, "stem"), "stem")
    nodes.append(helper.make_node("MaxPool", [x], ["pool0"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = "pool0", 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
        for b in range(blocks):
            n = f"s{stage}b{b}"
            stride = 2 if b == 0 and stage > 0 else 1
            y = relu(conv(x, cin, width, 1, 1, f"{n}.a"), f"{n}.a")
            y = relu(conv(y, width, width, 3, stride, f"{n}.b"), f"{n}.b")
            y = conv(y, width, width * 4, 1, 1, f"{n}.c")
            short = conv(x, cin, width * 4, 1, stride, f"{n}.down") if b == 0 else x
            nodes.append(helper.make_node("Add", [y, short], [f"{n}.sum"], name=f"{n}.add"))
            x, cin = relu(f"{n}.sum", n), width * 4
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten"))
    fc_weight = rng.standard_normal((classes, cin), dtype=np.float32) * np.float32(0.02)
    inits.append(numpy_helper.from_array(fc_weight, "fc.w"))
    inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b"))
    nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scheme", default="midrise-max", choices=("midrise-max", "symmetric-rms"))
    parser.add_argument("--max-bits", type=int, default=8)
    parser.add_argument("--format", default="qdq", choices=("qdq", "qonnx", "encodings"))
    parser.add_argument("--write", help="also write the lowered model here (timed separately)")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="run impq_onnx.lowering.verify on N random images (with --write, also save <out>.npz: "
                             "x and the simulated logits, for bench/mainline_ort.py)")
    args = parser.parse_args()

    from impq_onnx.frontend.canonical import from_proto
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.lowering.lower import lower, write
    from impq_onnx.quant.plan import PrecisionPlan

    proto = resnet50()
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    canonical = from_proto(proto, check_runtime=False)
    del proto
    sites = find_sites(canonical, (1, 3, 224, 224))
    plan = PrecisionPlan.uniform(sites, 4, 8, weight_scheme=args.scheme, default_clip=4.0)
    rng = np.random.default_rng(0)
    for layer in sites.layers:
        plan.weights[layer.node] = [int(b) for b in rng.integers(1, args.max_bits + 1, layer.kernels)]
    for i, site in enumerate(sites.activations):
        plan.activations[site.tensor] = 4 + i % 5
    weight_bytes = sum(layer.params for layer in sites.layers) * 4
    gc.collect()
    release_free_heap()
    before, maxrss_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with PeakRss() as peak:
        lowered = lower(canonical, plan, sites, format=args.format)
    seconds = time.perf_counter() - start
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = peak.peak - before
    size = lowered.proto.ByteSize()
    mb = 1024 * 1024
    print(f"model: {params / 1e6:.2f} M parameters ({len(sites.layers)} layers, {len(sites.activations)} activation "
          f"sites), float weights {weight_bytes / mb:.1f} MiB")
    print(f"plan: {args.scheme}, per-kernel bits 1..{args.max_bits}, format {args.format}")
    print(f"lower(): {seconds:.2f} s   (limit 10 s)")
    print(f"peak RSS delta: {extra / mb:.1f} MiB = {extra / weight_bytes:.2f}x the float weights   (limit 3x); "
          f"ru_maxrss grew {(maxrss_after - maxrss_before) / mb:.1f} MiB")
    print(f"lowered model: {size / mb:.1f} MiB serialized")
    if args.write:
        start = time.perf_counter()
        write(lowered, args.write)
        print(f"write(): {time.perf_counter() - start:.2f} s")
    ok = seconds < 10 and extra < 3 * weight_bytes
    if args.verify:
        from impq_onnx.lowering.verify import verify
        from impq_onnx.quant.simulate import simulate
        from impq_onnx.runtime import inference_session

        x = np.random.default_rng(1).standard_normal((args.verify, 3, 224, 224)).astype(np.float32)
        start = time.perf_counter()
        result = verify(lowered, canonical, plan, sites, [x[i:i + 4] for i in range(0, len(x), 4)])
        print(f"verify ({time.perf_counter() - start:.1f} s): {result.to_dict()}")
        ok = ok and result.ok
        if args.write:
            simulated = inference_session(simulate(canonical, plan, sites).SerializeToString())
            np.savez(os.path.splitext(args.write)[0] + ".npz", x=x, logits=simulated.run(None, {"image": x})[0])
    print("PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
