"""Class: options and config. Every numeric option of compress, evaluate and sensitivity is checked (finite,
range, integer) before any work, with the option named; a bit target that the start already meets is a
one-line warning; a YAML alias bomb, an oversized or non-UTF-8 config is one line naming the file."""

from __future__ import annotations


import pytest

from hostile_workspace import Workspace, cli, one_line_error
from impq_onnx.compression import CompressConfig
from impq_onnx.option_checks import target_warnings


@pytest.mark.parametrize("option, value, words", [
    ("--target-bits", "nan", "option 'target_bits': nan is not a finite number"),
    ("--target-bits", "inf", "option 'target_bits': inf is not a finite number"),
    ("--target-bits", "0", "option 'target_bits': 0.0 must be within 1..16"),
    ("--target-bits", "17", "option 'target_bits': 17.0 must be within 1..16"),
    ("--target-act-bits", "-inf", "option 'target_act_bits'"),
    ("--seed", "-1", "option 'seed': -1 must be within 0..4294967295"),
    ("--seed", str(2**70), "option 'seed'"),
    ("--batch-size", "0", "option 'batch_size': 0 must be within 1..65536"),
    ("--lr", "nan", "option 'lr': nan is not a finite number"),
    ("--lr", "0", "option 'lr': 0.0 must be greater than 0"),
    ("--epochs", "0", "option 'epochs': 0.0 must be greater than 0"),
    ("--steps", "0", "option 'steps': 0 must be within 1"),
    ("--momentum", "1", "option 'momentum'"),
    ("--time-budget", "nan", "option 'time_budget'"),
    ("--max-accuracy-drop", "-1", "option 'max_accuracy_drop'"),
    ("--threads", "0", "option 'threads'"),
    ("--val-fraction", "nan", "option 'val_fraction'"),
])
def test_compress_numeric_options(ws: Workspace, option: str, value: str, words: str) -> None:
    _refused_leaving_all_as_it_was(ws, ["compress", "m.onnx", "--data", "d.npz", "--output", "o.onnx", option, value],
                                   words)


def _refused_leaving_all_as_it_was(ws: Workspace, args: list[str], words: str) -> None:
    """One line with ``words``, exit 2, and not a file in the workspace changed, added or removed."""
    before, names = ws.digests(), ws.names()
    code, stderr = cli(*args, cwd=ws.root)
    one_line_error(code, stderr, 2, words)
    assert ws.digests() == before and ws.names() == names


def test_the_same_checks_apply_to_the_yaml_config(ws: Workspace) -> None:
    (ws.root / "c.yaml").write_text("target_bits: .nan\n")
    code, stderr = cli("compress", "m.onnx", "--data", "d.npz", "--config", "c.yaml", cwd=ws.root)
    one_line_error(code, stderr, 2, "option 'target_bits': nan is not a finite number")


@pytest.mark.parametrize("args, words", [
    (["evaluate", "m.onnx", "--data", "d.npz", "--batch-size", "0"], "--batch-size: 0 must be within 1..65536"),
    (["evaluate", "m.onnx", "--data", "d.npz", "--limit-per-class", "0"], "--limit-per-class"),
    (["evaluate", "m.onnx", "--data", "d.npz", "--threads", "0"], "--threads"),
    (["sensitivity", "m.onnx", "--data", "d.npz", "--seed", "-1"], "--seed: -1 must be within"),
    (["sensitivity", "m.onnx", "--data", "d.npz", "--samples", "0"], "--samples"),
    (["sensitivity", "m.onnx", "--data", "d.npz", "--runner-ups", "0"], "--runner-ups"),
    (["verify", "x.onnx", "--model", "m.onnx", "--plan", "p.plan.yaml", "--data", "d.npz", "--threads", "0"],
     "--threads"),
    (["verify", "x.onnx", "--model", "m.onnx", "--plan", "p.plan.yaml", "--data", "d.npz", "--logit-tolerance",
      "nan"], "--logit-tolerance"),
])
def test_other_commands_numeric_options(ws: Workspace, args: list[str], words: str) -> None:
    code, stderr = cli(*args, cwd=ws.root)
    one_line_error(code, stderr, 2, words)


def test_a_target_already_met_is_a_warning_and_an_unreachable_one_an_error() -> None:
    met = CompressConfig.resolve(model="m.onnx", data="d", target_bits=9, target_act_bits=8)
    assert target_warnings(met) == [
        "option 'target_bits': 9 is already met by start_bits 8; the weights phase ends at its start without "
        "lowering any bits (lower target_bits to search)",
        "option 'target_act_bits': 8 is already met by start_act_bits 8; the activations phase ends at its start "
        "without lowering any bits (lower target_act_bits to search)"]
    assert target_warnings(CompressConfig.resolve(model="m.onnx", data="d", target_bits=4)) == []
    assert target_warnings(CompressConfig.resolve(model="m.onnx", data="d", target_bits=9, method="faq")) == []


def _alias_bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_fails_before_expanding(ws: Workspace) -> None:
    bomb = _alias_bomb()
    assert len(bomb) < 400  # 9^9 = 387 million strings once expanded
    (ws.root / "bomb.yaml").write_text(bomb)
    code, stderr = cli("compress", "--config", "bomb.yaml", cwd=ws.root)
    one_line_error(code, stderr, 2, "bomb.yaml", "aliases are expanded")


@pytest.mark.parametrize("content, words", [
    (b"steps: 3\nmodel: m\xff.onnx\n", "not UTF-8 text (byte 0xff at offset 17)"),
    (b"steps: 3\n" + b"#" * (1 << 20), "over the limit of 1048576 bytes for a config file"),
    (b"[" * 5000, "c.yaml"),
    (b"steps: " + b"9" * 5000 + b"\n", "line 1: a number of 5000 digits; write one of at most 64"),
    (b"steps: 3\nseed: 1\nsteps: 4\n", "line 3: the key 'steps' is given twice (first at line 1); keep one"),
    (b"target_bits: 3\ntarget-bits: 5\n", "the option 'target_bits' is given twice"),
    (b"model: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "nested too deeply"),
])
def test_bad_config_files_are_one_line(ws: Workspace, content: bytes, words: str) -> None:
    (ws.root / "c.yaml").write_bytes(content)
    code, stderr = cli("compress", "--config", "c.yaml", cwd=ws.root)
    one_line_error(code, stderr, 2, "c.yaml", words)


@pytest.mark.parametrize("args, words", [
    (["compress", "m.onnx", "--data", "d.npz", "--output", ""], "--output: the value is empty"),
    (["compress", "m.onnx", "--data", "d.npz", "--output", "o.onnx", "--work-dir", " "],
     "--work-dir: the value is empty"),
    (["compress", "", "--data", "d.npz", "--output", "o.onnx"], "MODEL: the value is empty"),
    (["compress", "m.onnx", "--data", "d.npz", "--output", "o.onnx", "--config", ""], "--config: the value is empty"),
    (["compress", "m.onnx", "--data", "d.npz", "--output", "o.onnx", "--target-bits", ""],
     "--target-bits: the value is empty"),
    (["evaluate", "m.onnx", "--data", "d.npz", "--plan", ""], "--plan: the value is empty"),
    (["sensitivity", "m.onnx", "--data", "d.npz", "-o", ""], "-o/--output-prefix: the value is empty"),
    (["lower", "m.onnx", "--plan", "p.plan.yaml", "-o", ""], "-o/--output-path: the value is empty"),
    (["verify", "", "--model", "m.onnx", "--plan", "p.plan.yaml", "--data", "d.npz"], "LOWERED: the value is empty"),
    (["report", "", "-o", "r.html"], "WORK_DIRS: the value is empty"),
    (["inspect", ""], "MODEL: the value is empty"),
])
def test_an_empty_value_is_refused_not_read_as_the_default(ws: Workspace, args: list[str], words: str) -> None:
    """``-o "$OUT"`` with OUT unset: without the check, compress wrote m.impq.onnx in the current folder, sensitivity
    its default prefix, and evaluate --plan '' scored the float model as if no plan had been given."""
    _refused_leaving_all_as_it_was(ws, args, words)


def test_an_empty_value_in_the_yaml_config_or_the_api_is_refused(ws: Workspace) -> None:
    (ws.root / "c.yaml").write_text("output: ''\n")
    code, stderr = cli("compress", "m.onnx", "--data", "d.npz", "--config", "c.yaml", cwd=ws.root)
    one_line_error(code, stderr, 2, "'output': the value is empty; give a value, or none to leave it unset")
    from impq_onnx.errors import ConfigError

    with pytest.raises(ConfigError, match="option 'work_dir': the value is empty"):
        CompressConfig.resolve(model=str(ws.model), data=str(ws.data), work_dir="")
    assert CompressConfig.resolve(model=str(ws.model), data=str(ws.data), work_dir="none").work_dir is None


@pytest.mark.parametrize("args, words", [
    (["inspect"], "impq-onnx inspect: Missing argument 'MODEL'; see 'impq-onnx inspect --help'"),
    (["bogus"], "impq-onnx: No such command 'bogus'; see 'impq-onnx --help'"),
    (["evaluate", "m.onnx", "--data", "d.npz", "--input-shape", "1,1,0,0"],
     "impq-onnx evaluate: Invalid value for '--input-shape': '1,1,0,0' must contain positive sizes"),
    (["evaluate", "m.onnx", "--data", "d.npz", "--batch-size", "1e9"], "'--batch-size': '1e9' is not a valid integer"),
    (["lower", "m.onnx", "--plan", "p.plan.yaml", "-o", "x.onnx", "--static-batch", "0"], "'--static-batch'"),
    (["lower", "m.onnx", "--plan", "p.plan.yaml", "-o", "x.onnx", "--format", "qdqq"], "'--format'"),
    (["inspect", "."], "impq-onnx inspect: Invalid value for 'MODEL'"),
    (["evaluate", "m.onnx", "--data", "d.npz", "--events", "-", "--json"], "--events - and --json"),
    (["--bogus"], "impq-onnx: No such option '--bogus'"),
])
def test_a_usage_error_is_one_line_like_every_other_error(ws: Workspace, args: list[str], words: str) -> None:
    """click prints a usage error as four lines (Usage, Try, a blank line, Error); a pipeline that keeps an error's
    first line kept "Usage: ...". Now it is the tool's one line, exit 2, nothing written."""
    _refused_leaving_all_as_it_was(ws, args, words)


def test_the_bare_command_and_help_still_print_the_usage() -> None:
    from click.testing import CliRunner

    from impq_onnx.cli import main

    bare = CliRunner().invoke(main, [], prog_name="impq-onnx")
    assert "Usage: impq-onnx [OPTIONS] COMMAND" in bare.output and "impq-onnx: error" not in bare.output
    assert CliRunner().invoke(main, ["inspect", "--help"], prog_name="impq-onnx").exit_code == 0
