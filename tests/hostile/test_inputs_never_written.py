"""Class: the input is never written. Every output of compress and lower (the model and each derived file,
the work dir) against every input (model, plan, config, preprocess file, data file or tree), by resolved
path and inode: a clash is one line before any work, and every input keeps its bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hostile_workspace import Workspace, cli, one_line_error


def _compress_clashes(ws: Workspace) -> dict[str, tuple[list[str], str]]:
    root = ws.root
    (root / "same.onnx").symlink_to("m.onnx")
    os.link(ws.model, root / "hard.onnx")
    (root / "o.float.onnx").write_bytes(ws.model.read_bytes())
    (root / "c.config.yaml").write_text("steps: 1\n")
    (root / "pre.yaml").write_text("size: [8, 8]\n")
    (root / "images" / "cls").mkdir(parents=True)
    data = ["--data", "d.npz"]
    return {
        "same path": (["m.onnx", *data, "--output", "m.onnx"], "is the input model"),
        "./ spelling": (["m.onnx", *data, "--output", "./m.onnx"], "is the input model"),
        "absolute path": (["m.onnx", *data, "--output", str(ws.model)], "is the input model"),
        "symlink to the input": (["m.onnx", *data, "--output", "same.onnx"], "is the input model"),
        "hard link to the input": (["m.onnx", *data, "--output", "hard.onnx"], "is the input model"),
        "derived float output": (["o.float.onnx", *data, "--output", "o.onnx"], "derived output o.float.onnx"),
        "derived config output": (["m.onnx", *data, "--config", "c.config.yaml", "--output", "c.onnx"],
                                  "is the config file"),
        "preprocess file": (["m.onnx", *data, "--preprocess", "pre.yaml", "--output", "pre.yaml"],
                            "is the preprocess file"),
        "data file": (["m.onnx", *data, "--output", "d.npz"], "is the data file"),
        "inside the data tree": (["m.onnx", "--data", "images", "--output", "images/cls/x.onnx"],
                                 "inside the data folder"),
        "work dir holds the model": (["m.onnx", *data, "--output", "o.onnx", "--work-dir", "."], "holds the input"),
        "work dir inside the data": (["m.onnx", "--data", "images", "--output", "o.onnx", "--work-dir", "images/w"],
                                     "inside the data folder"),
        "work dir is the output": (["m.onnx", *data, "--output", "o.onnx", "--work-dir", "o.onnx"], "--work-dir"),
    }


CASES = ["same path", "./ spelling", "absolute path", "symlink to the input", "hard link to the input",
         "derived float output", "derived config output", "preprocess file", "data file", "inside the data tree",
         "work dir holds the model", "work dir inside the data", "work dir is the output"]


@pytest.mark.parametrize("case", CASES)
def test_compress_never_writes_an_input(ws: Workspace, case: str) -> None:
    args, words = _compress_clashes(ws)[case]
    before, names = ws.digests(), ws.names()
    code, stderr = cli("compress", *args, cwd=ws.root)
    one_line_error(code, stderr, 2, words)
    assert ws.digests() == before and ws.names() == names  # inputs unchanged, nothing created


@pytest.mark.parametrize("output, words", [
    ("m.onnx", "is the input model"),
    ("p.plan.yaml", "is the plan"),
    ("sym.onnx", "is the input model"),
])
def test_lower_never_writes_its_model_or_plan(ws: Workspace, output: str, words: str) -> None:
    (ws.root / "sym.onnx").symlink_to(ws.model)
    before, names = ws.digests(), ws.names()
    code, stderr = cli("lower", "m.onnx", "--plan", "p.plan.yaml", "-o", output, cwd=ws.root)
    one_line_error(code, stderr, 2, words, "-o")
    assert ws.digests() == before and ws.names() == names


def test_lower_sidecar_never_overwrites_the_plan(ws: Workspace) -> None:
    (ws.root / "o.onnx.bits.json").write_bytes(ws.plan.read_bytes())  # a plan that happens to have this name
    before = ws.digests()
    code, stderr = cli("lower", "m.onnx", "--plan", "o.onnx.bits.json", "-o", "o.onnx", cwd=ws.root)
    one_line_error(code, stderr, 2, "derived output o.onnx.bits.json", "is the plan")
    assert ws.digests() == before and not (ws.root / "o.onnx").exists()


def test_lower_writes_beside_its_inputs_when_nothing_clashes(ws: Workspace) -> None:
    before = ws.digests()
    code, stderr = cli("lower", "m.onnx", "--plan", "p.plan.yaml", "-o", "q.onnx", cwd=ws.root)
    assert code == 0, stderr
    after = ws.digests()
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"q.onnx", "q.onnx.bits.json"}
    assert not [p for p in Path(ws.root).iterdir() if p.name.startswith(".")]  # no lock, no staging left


@pytest.mark.parametrize("command", ["compress", "lower"])
def test_no_output_overwrites_the_models_external_data(ws: Workspace, command: str) -> None:
    # a model that keeps its weights in w.bin beside it: w.bin is an input too, under the output's name or a
    # derived output's (x.onnx.bits.json)
    import onnx
    from onnx import external_data_helper

    for location in ("w.bin", "x.onnx.bits.json"):
        proto = onnx.load(ws.model)
        external_data_helper.convert_model_to_external_data(proto, all_tensors_to_one_file=True, location=location,
                                                            size_threshold=0)
        onnx.save(proto, ws.root / f"ext-{location}.onnx")
    for location, output in (("w.bin", "w.bin"), ("x.onnx.bits.json", "x.onnx")):
        before, names = ws.digests(), ws.names()
        args = (["--data", "d.npz", "--output", output] if command == "compress"
                else ["--plan", "p.plan.yaml", "-o", output])
        code, stderr = cli(command, f"ext-{location}.onnx", *args, cwd=ws.root)
        one_line_error(code, stderr, 2, f"the input model's external data file '{location}'")
        assert ws.digests() == before and ws.names() == names


@pytest.mark.parametrize("extra, prefix, words", [
    (["--classes", "lab.json"], "lab", "the JSON output lab.json is the classes file"),
    (["--plan", "p.json"], "p", "the JSON output p.json is the plan"),
    (["--preprocess", "pre.json"], "pre", "the JSON output pre.json is the preprocess file"),
    ([], "images/cls/s", "lies inside the data folder"),
])
def test_sensitivity_never_writes_an_input(ws: Workspace, extra: list[str], prefix: str, words: str) -> None:
    root = ws.root
    (root / "lab.json").write_text('["a", "b", "c", "d"]')
    (root / "p.json").write_bytes(ws.plan.read_bytes())  # a plan under a .json name (YAML reads JSON)
    (root / "pre.json").write_text('{"size": [8, 8]}')
    (root / "images" / "cls").mkdir(parents=True)
    data = "images" if prefix.startswith("images") else "d.npz"
    before, names = ws.digests(), ws.names()
    code, stderr = cli("sensitivity", "m.onnx", "--data", data, "--samples", "8", *extra, "-o", prefix, cwd=root)
    one_line_error(code, stderr, 2, words, "-o/--output-prefix")
    assert ws.digests() == before and ws.names() == names


@pytest.mark.parametrize("command", ["evaluate", "sensitivity", "compress"])
@pytest.mark.parametrize("events, data, words", [
    ("lab.json", "d.npz", "is the input lab.json"),  # the classes file
    ("hard.jsonl", "d.npz", "is the input lab.json"),  # a hard link to it
    ("w.bin", "d.npz", "is the input ext.onnx's external data file 'w.bin'"),
    ("images/cls/e.jsonl", "images", "lies inside the input folder images"),
])
def test_events_never_overwrite_an_input(ws: Workspace, command: str, events: str, data: str, words: str) -> None:
    import onnx
    from onnx import external_data_helper

    root = ws.root
    (root / "lab.json").write_text('["a", "b", "c", "d"]')
    os.link(root / "lab.json", root / "hard.jsonl")
    (root / "images" / "cls").mkdir(parents=True)
    proto = onnx.load(ws.model)
    external_data_helper.convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="w.bin",
                                                        size_threshold=0)
    onnx.save(proto, root / "ext.onnx")
    before, names = ws.digests(), ws.names()
    extra = ["--output", "o.onnx"] if command == "compress" else []
    code, stderr = cli(command, "ext.onnx", "--data", data, "--classes", "lab.json", *extra, "--events", events,
                       cwd=root)
    one_line_error(code, stderr, 2, "--events", words)
    assert ws.digests() == before and ws.names() == names
