"""Check every exported model and (re)write tests/models/exported/manifest.json.

Needs: onnx==1.17.0, onnxruntime-training-cpu==1.19.2 (the project's own venv is fine:
    .venv/bin/python models/exporters/make_manifest.py
from the repository root). Reads models/exporters/meta_*.json written by the export_*.py
scripts (exporter name/version, layout, logits output, quirks) and computes the rest from
the ONNX files themselves:

  opset            default-domain ("" / ai.onnx) opset import
  ir_version       ModelProto.ir_version
  input_shape      declared shape of the (single) real input; symbolic dims are strings
                   (their dim_param), unknown dims are null
  outputs          graph output names, in order
  conv_layers      number of Conv nodes
  gemm_or_matmul_layers
                   number of Gemm/MatMul nodes whose B input is a constant (initializer or
                   Constant node output, possibly reached through Cast/Identity/Transpose/
                   Reshape/Unsqueeze of a constant)
  conv_const_weight_layers
                   number of Conv nodes whose W input is such a constant
  reference_io     <stem>.ref.npz beside the model, written by the export script: 'input' and
                   'output_<i>' (graph-output order) as computed by the source framework itself
  reference_max_abs_diff
                   max |onnxruntime - framework| over the outputs for that input
  ort_1_19_runs    whether onnxruntime (the version imported here) can create a session
                   and run a random input; ort_error holds the message if not

It fails (exit 1) if onnx.checker.check_model fails on any file.
"""
import glob
import json
import os
import sys
from collections import Counter

import numpy as np
import onnx

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "models", "exported")
HERE = os.path.dirname(os.path.abspath(__file__))

PASS_THROUGH = {"Cast", "Identity", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "DequantizeLinear"}


def graph_facts(model):
    g = model.graph
    inits = {i.name for i in g.initializer}
    producer = {}
    for n in g.node:
        for o in n.output:
            producer[o] = n

    def is_const(name, depth=0):
        if name in inits:
            return True
        n = producer.get(name)
        if n is None or depth > 4:
            return False
        if n.op_type == "Constant":
            return True
        if n.op_type in PASS_THROUGH:
            return all(is_const(i, depth + 1) for i in n.input if i)
        return False

    ops = Counter(n.op_type for n in g.node)
    conv = [n for n in g.node if n.op_type == "Conv"]
    gm = [n for n in g.node if n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and is_const(n.input[1])]
    real_inputs = [i for i in g.input if i.name not in inits]
    return dict(ops=ops, conv=len(conv), conv_const=sum(is_const(n.input[1]) for n in conv),
                gemm=len(gm), real_inputs=real_inputs, inits=inits)


def shape_of(vi):
    dims = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def try_ort(path, inp, layout):
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover
        return None, f"onnxruntime not importable: {e}"
    try:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        i = sess.get_inputs()[0]
        shp = [d if isinstance(d, int) else (1 if k == 0 else 32) for k, d in enumerate(i.shape)]
        dt = np.float16 if "float16" in i.type else np.float32
        x = np.random.default_rng(0).standard_normal(shp).astype(dt)
        outs = sess.run(None, {i.name: x})
        return True, {"ort_version": ort.__version__, "output_shapes": [list(o.shape) for o in outs]}
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"[:500]


def check_ref(path, ref):
    """Max |ORT - framework| over all outputs of the reference I/O file (None if ORT fails)."""
    import onnxruntime as ort
    r = np.load(ref)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: r["input"]})
    return max(float(np.max(np.abs(o.astype(np.float64) - r[f"output_{i}"].astype(np.float64))))
               for i, o in enumerate(outs))


def main():
    meta = []
    for f in sorted(glob.glob(os.path.join(HERE, "meta_*.json"))):
        with open(f) as fh:
            meta.extend(json.load(fh))
    entries, bad = [], []
    for m in meta:
        path = os.path.join(OUT, m["file"])
        if not os.path.exists(path):
            print("MISSING", m["file"])
            bad.append(m["file"])
            continue
        try:
            onnx.checker.check_model(path, full_check=False)  # by path: works with external data
            checker_ok = True
        except Exception as e:  # noqa: BLE001
            print("CHECKER FAIL", m["file"], e)
            checker_ok = False
            bad.append(m["file"])
        model = onnx.load(path, load_external_data=False)
        facts = graph_facts(model)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        inp = facts["real_inputs"][0]
        ok, info = try_ort(path, inp, m["layout"])
        size = os.path.getsize(path) + sum(os.path.getsize(os.path.join(OUT, x)) for x in m.get("extra_files", []))
        e = dict(file=m["file"], exporter=m["exporter"], exporter_version=m["exporter_version"],
                 producer=f"{model.producer_name} {model.producer_version}".strip(),
                 opset=opset, ir_version=model.ir_version,
                 input_name=inp.name, input_shape=shape_of(inp),
                 input_dtype=onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name,
                 layout=m["layout"], logits_output=m["logits_output"],
                 outputs=[o.name for o in model.graph.output], num_classes=m["num_classes"],
                 conv_layers=facts["conv"], conv_const_weight_layers=facts["conv_const"],
                 gemm_or_matmul_layers=facts["gemm"],
                 initializers_as_inputs=sum(1 for i in model.graph.input if i.name in facts["inits"]),
                 op_histogram=dict(sorted(facts["ops"].items())),
                 extra_files=m.get("extra_files", []), size_bytes=size,
                 checker_ok=checker_ok, ort_1_19_runs=ok, quirks=m["quirks"])
        ref = os.path.join(OUT, m["file"][:-len(".onnx")] + ".ref.npz")
        if os.path.exists(ref):
            e["reference_io"] = os.path.basename(ref)
            e["reference_max_abs_diff"] = check_ref(path, ref) if ok else None
        if ok:
            e["ort_output_shapes"] = info["output_shapes"]
        else:
            e["ort_error"] = info
        entries.append(e)
        print(f"{m['file']:45s} opset={opset} ir={model.ir_version} in={inp.name}{shape_of(inp)} "
              f"out={e['outputs']} conv={facts['conv']} gemm={facts['gemm']} ort={ok} size={size} "
              f"refdiff={e.get('reference_max_abs_diff')}")
        if not ok:
            print("   ORT:", info)
    with open(os.path.join(OUT, "manifest.json"), "w") as fh:
        json.dump(entries, fh, indent=1)
        fh.write("\n")
    print("manifest entries:", len(entries))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
