"""The typed Python API (impq_onnx.api): every top-level function, every data form, in-memory models, silence.

Real parts throughout: the bundled Fashion-MNIST model, its PNG images decoded with Pillow, real onnxruntime
sessions and a real (short) compress run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect as pyinspect
import logging
import types
import typing
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from PIL import Image

import impq_onnx
from impq_onnx import api
from impq_onnx.compression import CompressConfig
from impq_onnx.data.in_memory import in_memory_data
from impq_onnx.errors import ConfigError, DataError, ModelError
from impq_onnx.quant.plan import PrecisionPlan

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "fashion-mnist"
MODEL = DEMO / "model.onnx"
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def decode(folder: Path, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(class_dir.glob("*.png"))[:per_class]:
            images.append(np.asarray(Image.open(path).convert("L")))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


@pytest.fixture(scope="module")
def test_arrays() -> tuple[np.ndarray, np.ndarray]:
    return decode(DEMO / "test")


@pytest.fixture(scope="module")
def folder_result():
    return impq_onnx.evaluate(MODEL, DEMO / "test")


# --- the package names -------------------------------------------------------------------------------------

def test_top_level_names_are_the_api_functions_also_after_their_subpackages_are_imported():
    import impq_onnx.report  # noqa: F401  (the subpackages of the same names, imported by their full names)
    import impq_onnx.sensitivity
    from impq_onnx.report import write_report  # the subpackage stays importable

    assert callable(write_report)
    for name in ("load", "inspect", "evaluate", "sensitivity", "compress", "lower", "verify", "report"):
        assert getattr(impq_onnx, name) is getattr(api, name), name
    assert impq_onnx.compress.__module__ == "impq_onnx.api"


def test_compress_takes_every_config_field_as_a_typed_keyword():
    parameters = pyinspect.signature(api.compress).parameters
    fields = {f.name for f in dataclasses.fields(CompressConfig)} - {"model", "data"}
    assert fields | {"model", "data", "config", "progress"} == set(parameters)
    assert not any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    assert all(p.kind is p.KEYWORD_ONLY for name, p in parameters.items() if name not in ("model", "data"))
    assert (ROOT / "impq_onnx" / "py.typed").is_file()
    # "with its type" (docs/api.md): the keyword's annotation takes the field's type (and DEFAULT where that is
    # its default), None included where the field takes None, so a type checker accepts every value the config
    # accepts (output and work_dir take os.PathLike as well)
    keyword_types = typing.get_type_hints(api.compress)
    field_types = typing.get_type_hints(CompressConfig)

    def members(tp) -> set:
        return set(typing.get_args(tp)) if typing.get_origin(tp) in (typing.Union, types.UnionType) else {tp}

    wrong = {name: (keyword_types[name], field_types[name]) for name in sorted(fields)
             if not members(field_types[name]) | ({api.Default} if parameters[name].default is api.DEFAULT else set())
             <= members(keyword_types[name])}
    assert not wrong, wrong


# --- load / inspect ----------------------------------------------------------------------------------------

def test_load_and_inspect_take_a_path_a_proto_or_a_canonical_model():
    proto = onnx.load(MODEL)
    before = proto.SerializeToString()
    from_path, from_proto = impq_onnx.load(MODEL), impq_onnx.load(proto)
    assert from_path.to_bytes() == from_proto.to_bytes()
    assert proto.SerializeToString() == before  # the caller's proto is not modified
    assert impq_onnx.load(from_path) is from_path
    shown = [impq_onnx.inspect(m, input_shape=(1, 1, 28, 28)) for m in (MODEL, proto, from_path)]
    assert shown[0].to_dict()["layers"] == shown[1].to_dict()["layers"] == shown[2].to_dict()["layers"]
    assert shown[0].model == str(MODEL) and shown[1].model == "<in-memory model>"
    assert len(shown[0].sites.layers) > 0 and "conv" in shown[0].table().lower()
    assert impq_onnx.load(MODEL, output=from_path.logits).to_bytes() == from_path.to_bytes()  # the former name
    with pytest.raises(ConfigError, match="name different tensors"):
        impq_onnx.load(MODEL, logits="a", output="b")
    with pytest.raises(ModelError, match="a list is not a model"):
        impq_onnx.load([1, 2])  # type: ignore[arg-type]


# --- data forms --------------------------------------------------------------------------------------------

class Reader:
    """onnxruntime's CalibrationDataReader protocol: get_next() gives {input name: batch}, then None."""

    def __init__(self, images: np.ndarray):
        self.batches = iter([{"input": images[i : i + 50]} for i in range(0, len(images), 50)])

    def get_next(self):
        return next(self.batches, None)


def test_every_data_form_evaluates_as_the_folder_does(test_arrays, folder_result):
    images, labels = test_arrays
    assert folder_result.n == 200 and folder_result.top1 is not None and folder_result.top1 > 0.6
    labelled = {
        "(images, labels)": (images, labels),
        "{'x', 'y'}": {"x": images, "y": labels},
        "list of (x, y) batches": [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 200, 32)],
        "callable of batches": lambda: ((images[i : i + 64], labels[i : i + 64]) for i in range(0, 200, 64)),
        "generator": ((images[i : i + 7], labels[i : i + 7]) for i in range(0, 200, 7)),
        "NCHW float in [0, 1]": ((images[:, None] / 255.0).astype(np.float32), labels),
        "{'train', 'test'}": {"train": (images[:10], labels[:10]), "test": (images, labels)},
    }
    for form, data in labelled.items():
        result = impq_onnx.evaluate(MODEL, data)
        assert (result.n, result.top1, result.top5) == (200, folder_result.top1, folder_result.top5), form
    unlabelled = {"images": images, "(images,)": (images,), "CalibrationDataReader": Reader(images),
                  "[N, H, W, 1] batches": [images[i : i + 100, :, :, None] for i in (0, 100)]}
    for form, data in unlabelled.items():
        result = impq_onnx.evaluate(MODEL, data, plan=None)
        assert result.n == 200 and result.top1 is None, form


def test_model_input_arrays_are_fed_unchanged(test_arrays, folder_result):
    from impq_onnx.data import PRESETS, dataset_from_arrays

    images, labels = test_arrays
    x = next(dataset_from_arrays(images, labels, PRESETS["fashion-mnist"]).batches(200))[0]  # normalised NCHW
    assert x.min() < 0  # not pixels in [0, 1]
    result = impq_onnx.evaluate(impq_onnx.load(MODEL), (x, labels), preprocess="model-input")
    assert (result.n, result.top1) == (200, folder_result.top1)


def test_array_data_errors_are_one_line_data_errors(test_arrays):
    images, labels = test_arrays
    with pytest.raises(DataError, match="batch 1 holds uint8 images of shape \\[14, 14\\]"):
        in_memory_data([images[:5], images[:5, :14, :14]])
    with pytest.raises(DataError, match="batch 1 has no labels"):
        in_memory_data([(images[:5], labels[:5]), images[5:10]])
    with pytest.raises(DataError, match="dtype int32"):
        in_memory_data(images.astype(np.int32))
    with pytest.raises(DataError, match="yielded no batches"):
        in_memory_data([])
    with pytest.raises(DataError, match="has no 'train' entry"):
        in_memory_data({"test": images})
    with pytest.raises(DataError, match="int is not a data form"):
        in_memory_data(3)
    with pytest.raises(DataError, match=r"the image array holds NaN or infinite values \(image 7\)"):
        in_memory_data(np.where(np.arange(len(images))[:, None, None] == 7, np.nan, images / 255.0))
    with pytest.raises(DataError, match="label 12 is out of range for <in-memory model>, which has 10 outputs"):
        impq_onnx.evaluate(onnx.load(MODEL), (images, np.full(len(images), 12)))
    # the digest that records the data in the outputs depends on the pixels and the labels
    a, b = in_memory_data((images, labels)), in_memory_data((images, labels[::-1].copy()))
    assert a.train.digest != b.train.digest and a.label.startswith("<arrays: 200 labelled 28x28x1 uint8")


# --- sensitivity / lower / verify --------------------------------------------------------------------------

def test_sensitivity_of_arrays_equals_that_of_the_folder():
    images, labels = decode(DEMO / "train", per_class=8)
    from_arrays = impq_onnx.sensitivity(onnx.load(MODEL), (images, labels), samples=32, seed=3)
    folder = impq_onnx.sensitivity(MODEL, DEMO / "train", samples=32, seed=3, preprocess="fashion-mnist")
    assert from_arrays.n_samples == 32 and set(from_arrays.weights) == set(folder.weights)
    assert all(v > 0 for v in from_arrays.weights.values())
    with pytest.raises(ConfigError, match="option 'weighting': 'wrong'"):
        impq_onnx.sensitivity(MODEL, (images, labels), weighting="wrong")  # type: ignore[arg-type]


def test_lower_in_memory_then_verify_against_arrays(tmp_path, test_arrays):
    proto = onnx.load(MODEL)
    canonical = impq_onnx.load(proto)
    plan = PrecisionPlan.uniform(impq_onnx.inspect(canonical).sites, 4, 6, default_clip=4.0)
    in_memory = impq_onnx.lower(proto, plan)
    assert in_memory.paths == [] and not list(tmp_path.iterdir())  # nothing written without output=
    assert in_memory.sidecar["summary"]["weight_bits_effective"] == pytest.approx(4.0)
    written = impq_onnx.lower(MODEL, plan, output=tmp_path / "q.onnx")
    assert written.paths == [tmp_path / "q.onnx", tmp_path / "q.onnx.bits.json"]
    assert (tmp_path / "q.onnx").read_bytes() == in_memory.model.SerializeToString()
    for lowered in (in_memory, written.paths[0]):
        result = impq_onnx.verify(lowered, proto, plan, test_arrays)
        assert result.ok and result.samples == 200, result.to_dict()
    broken = onnx.ModelProto()
    broken.CopyFrom(in_memory.model)
    tensor = next(t for t in broken.graph.initializer if t.data_type == onnx.TensorProto.INT8)
    codes = onnx.numpy_helper.to_array(tensor).copy()
    codes.flat[0] = 0 if codes.flat[0] != 0 else 1  # one weight code changed
    tensor.CopyFrom(onnx.numpy_helper.from_array(codes, tensor.name))
    result = impq_onnx.verify(dataclasses.replace(in_memory, model=broken), proto, plan, test_arrays)
    assert not result.ok and result.record_mismatches


# --- compress ----------------------------------------------------------------------------------------------

def _load_example():
    spec = importlib.util.spec_from_file_location("pipeline_example", ROOT / "docs" / "examples" / "pipeline.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pipeline_example_compresses_arrays_silently(tmp_path, capfd):
    """docs/examples/pipeline.py: compress of an in-memory model on numpy arrays prints nothing, writes exactly
    the documented files, reaches its bit targets and leaves the root logger and the model as they were."""
    example = _load_example()
    proto = onnx.load(example.DEMO / "model.onnx")
    proto_bytes = proto.SerializeToString()
    handlers = list(logging.getLogger().handlers)
    result = example.run(tmp_path)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert logging.getLogger().handlers == handlers  # no handler added: the caller's basicConfig still works

    names = {"model.impq.onnx", "model.impq.onnx.bits.json", "model.impq.plan.yaml", "model.impq.report.json",
             "model.impq.config.yaml", "model.impq.float.onnx", "model.impq.work"}
    if HAS_MATPLOTLIB:
        names |= {"model.impq.report.html"} | {p.name for p in tmp_path.glob("model.impq.report.*.png")}
        assert len(list(tmp_path.glob("model.impq.report.*.png"))) >= 3
    assert {p.name for p in tmp_path.iterdir()} == names
    assert result.stop_reason == "target_act_bits"
    assert result.final["weight_bits_effective"] <= 5.0 and result.final["activation_bits_effective"] <= 6.0
    assert result.final["test_n"] == 200 and result.final["test_top1"] > 0.6
    assert result.paths["output"] == tmp_path / "model.impq.onnx"
    assert result.config.model.startswith("<in-memory model, sha256 ")
    assert result.config.data.startswith("<arrays['train']: 600 labelled")
    assert "arrays['test']: 200 labelled" in result.config.data
    assert onnx.load(example.DEMO / "model.onnx").SerializeToString() == proto_bytes  # the input, unchanged

    check = impq_onnx.verify(tmp_path / "model.impq.onnx", tmp_path / "model.impq.float.onnx",
                             tmp_path / "model.impq.plan.yaml", decode(DEMO / "test"))
    assert check.ok, check.to_dict()
    if HAS_MATPLOTLIB:
        written = impq_onnx.report(tmp_path / "model.impq.work", tmp_path / "r" / "r.html")
        assert written.html == tmp_path / "r" / "r.html" and "<html" in written.html.read_text().lower()
        assert written.figures and all(p.is_file() and p.suffix == ".png" for p in written.figures)
    assert capfd.readouterr() == ("", "")


def test_compress_progress_callback_and_config_object(tmp_path, test_arrays):
    images, labels = test_arrays
    events: list[object] = []
    config = CompressConfig(steps=2, start_steps=2, sensitivity_samples=16, max_iterations=1, max_val_samples=20,
                            phases="weights", target_bits=2.0, target_act_bits=None, report=False, batch_size=16)
    result = impq_onnx.compress(onnx.load(MODEL), (images, labels), output=tmp_path / "c.onnx", config=config,
                                steps=3, target_bits=None, progress=events.append)
    assert result.config.steps == 3 and result.config.sensitivity_samples == 16  # keyword over config
    assert result.config.target_bits is None and result.config.target_act_bits is None  # None: no target
    assert [r.kind for r in result.iterations] == ["start", "lower"]
    assert result.iterations[-1].fine_tune_steps == 3
    assert events  # the callback received the progress
    assert (tmp_path / "c.onnx").is_file() and not (tmp_path / "c.report.html").exists()


def test_compress_of_an_in_memory_model_needs_output(tmp_path, test_arrays, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="in-memory model needs output="):
        impq_onnx.compress(onnx.load(MODEL), test_arrays)
    with pytest.raises(ConfigError, match="option 'method'"):
        impq_onnx.compress(MODEL, test_arrays, output=tmp_path / "x.onnx", method="nope")
    assert not list(tmp_path.iterdir())


def test_without_matplotlib_compress_skips_the_html_report_with_one_warning(tmp_path, test_arrays, monkeypatch,
                                                                           caplog):
    from impq_onnx import compression
    from impq_onnx.errors import PlatformError

    monkeypatch.setattr(compression, "report_available", lambda: False)  # as in a core install
    with caplog.at_level(logging.WARNING, logger="impq_onnx"):
        result = impq_onnx.compress(MODEL, test_arrays, output=tmp_path / "m.onnx", phases="weights", steps=2,
                                    start_steps=2, sensitivity_samples=16, max_iterations=1, target_bits=None,
                                    max_val_samples=20)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no HTML report: matplotlib is not installed" in warnings[0]
    assert result.paths["output"].is_file() and not result.paths["report_html"].exists()
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(PlatformError, match=r"pip install 'impq-onnx\[report\]'"):
        impq_onnx.report(result.paths["work_dir"], tmp_path / "r.html")
