"""The pieces every ``impq-onnx`` command shares: the one-line error wrapper, the common options
(``--logits``, ``--json``, ``--quiet``/``--events``), the ``--json`` document and the progress reporting.
:mod:`impq_onnx.cli` defines the commands with them."""

from __future__ import annotations

import contextlib
import functools
import sys
import traceback
from typing import Any

import click

from impq_onnx.errors import as_impq_error

__all__ = ["user_errors", "OneLineGroup", "parse_shape", "examples", "BUNDLED", "logits_options", "logits_name",
           "json_option", "progress_options", "dump", "reporting", "write_stdout"]


def _refuse_empty(kwargs) -> None:
    """An empty path or value (``-o "$OUT"`` with OUT unset) is an error naming the option, never read as "not
    given": an optional path would fall back to its default (``evaluate --plan ''`` would score the float model)."""
    from impq_onnx.errors import ConfigError

    for param in click.get_current_context().command.params:
        value = kwargs.get(param.name)
        if any(isinstance(v, str) and not v.strip() for v in (value if isinstance(value, tuple) else (value,))):
            if isinstance(param, click.Argument):
                raise ConfigError(f"{param.human_readable_name}: the value is empty; give a path")
            raise ConfigError(f"{'/'.join(param.opts)}: the value is empty; give one, or leave the option out")


def user_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            _refuse_empty(kwargs)
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            error = as_impq_error(exc)
            if click.get_current_context().find_root().params.get("verbose", 0) >= 2:
                traceback.print_exception(error)  # with the chain of causes
            if isinstance(exc, OSError):  # read-only folder, full disk, a name too long...: one line naming the path
                from impq_onnx.outputs import describe_os_error

                click.echo(f"impq-onnx: error: {describe_os_error(exc)}", err=True)
            else:
                click.echo(f"impq-onnx: error: {error}", err=True)
            sys.exit(error.exit_code)

    return wrapper


def parse_shape(ctx, param, value):
    if value is None:
        return None
    try:
        shape = tuple(int(d) for d in value.replace("x", ",").split(","))
    except ValueError as exc:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers, e.g. 1,3,224,224") from exc
    if not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(f"'{value}' must contain positive sizes, e.g. 1,3,224,224")
    return shape


def examples(*lines: str) -> str:
    """A ``--help`` epilog: the examples, unwrapped."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


BUNDLED = "models/fashion-mnist"


def logits_options(func):
    """``--logits NAME`` and its deprecated alias ``--output NAME``."""
    func = click.option("--output", "output_alias", metavar="NAME",
                        help="Deprecated alias of --logits (the name of the logits tensor).")(func)
    return click.option("--logits", metavar="NAME",
                        help="Name of the logits tensor when the model has several outputs.")(func)


def logits_name(logits: str | None, alias: str | None) -> str | None:
    if alias is not None:
        click.echo("impq-onnx: warning: --output NAME is deprecated for the logits tensor; use --logits NAME",
                   err=True)
        if logits is not None and logits != alias:
            raise click.UsageError(f"--logits {logits} and --output {alias} name different tensors; give --logits")
    return logits if logits is not None else alias


def json_option(func):
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout (keys in the README); logs and progress go to "
                             "stderr.")(func)


def progress_options(func):
    func = click.option("--events", "events", metavar="FILE", type=click.Path(dir_okay=False, allow_dash=True),
                        help="Write every progress event as a JSON line to FILE (- : stdout, then not with "
                             "--json).")(func)
    return click.option("-q", "--quiet", is_flag=True, help="No progress bar or lines (errors still print).")(func)


def dump(document: dict) -> None:
    """The one JSON document of ``--json`` on stdout."""
    import json

    from impq_onnx.events import json_safe

    write_stdout(json.dumps(json_safe(document), allow_nan=False) + "\n")


def write_stdout(text: str) -> None:
    """``text`` on stdout, or an error naming it: a closed stdout (``>&-``) printed nothing and exited 0, a full
    disk under ``> file`` said only "No space left on device"."""
    if sys.stdout is None:
        raise _stdout_closed("--json")
    stream = _NamedStream(sys.stdout, "stdout")
    stream.write(text)
    stream.flush()


def _stdout_closed(option: str) -> Exception:
    from impq_onnx.errors import PlatformError

    return PlatformError(f"stdout is closed, so {option} has nowhere to print; run the command with an open stdout "
                         "(> result.json)")


class _NamedStream:
    """A text stream whose write errors name it (``--events FILE`` on a full disk says which file)."""

    def __init__(self, stream: Any, name: str):
        self.stream, self.name = stream, name

    def _named(self, exc: OSError) -> OSError:
        return OSError(exc.errno, exc.strerror, exc.filename if exc.filename is not None else self.name)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as exc:
            raise self._named(exc) from exc

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as exc:
            raise self._named(exc) from exc

    def close(self) -> None:
        try:
            self.stream.close()
        except OSError as exc:
            raise self._named(exc) from exc


def _check_events_file(events, inputs: tuple) -> None:
    """``--events`` must not be an input file (nor a link to one, nor a model's external data file) and must not
    lie in an input folder (the data)."""
    from pathlib import Path

    from impq_onnx.frontend.model_file import model_inputs
    from impq_onnx.outputs import check_not_an_input

    files: dict[str, Path] = {}
    trees: dict[str, Path] = {}
    for given in inputs:
        path = Path(given) if given else None
        if path is None or not path.exists():
            continue
        if path.is_dir():
            trees[f"the input folder {given}"] = path
        elif path.suffix.lower() == ".onnx":
            files.update(model_inputs(path, f"the input {given}"))
        else:
            files[f"the input {given}"] = path
    check_not_an_input("--events", events, files, trees, flag="--events")


@contextlib.contextmanager
def reporting(quiet: bool, events: str | None, as_json: bool = False, inputs: tuple = ()):
    """The command's progress callback (:class:`~impq_onnx.cli_progress.Renderer`) and the stream its human
    result goes to (stdout, or stderr when the events take stdout). ``inputs``: paths ``--events`` must not be."""
    from pathlib import Path

    from impq_onnx.cli_progress import Renderer

    if events == "-" and as_json:
        raise click.UsageError("--events - and --json both write to stdout; give --events a file")
    if sys.stdout is None and (as_json or events == "-"):  # found before the run, not after it
        raise _stdout_closed("--json" if as_json else "--events -")
    stream: Any = None
    if events == "-":
        stream = _NamedStream(sys.stdout, "stdout")
    elif events:
        _check_events_file(Path(events), inputs)
        target = Path(events).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        stream = _NamedStream(open(events, "w", encoding="utf-8"), events)  # closed below
    renderer = Renderer(quiet=quiet, events=stream)
    try:
        yield renderer, (sys.stderr if events == "-" else sys.stdout)
    finally:
        renderer.close()
        if stream is not None and events != "-":
            stream.close()


class _OneLineUsageError(click.UsageError):
    """A usage error shown as the tool's other errors are: one line on stderr, exit 2 (click prints four)."""

    def __init__(self, error: click.UsageError):
        super().__init__(error.format_message(), error.ctx)

    def show(self, file: Any = None) -> None:
        from impq_onnx.files import shown

        path = self.ctx.command_path if self.ctx is not None else "impq-onnx"
        message = shown(" ".join(self.format_message().split())).rstrip(".")  # one line, no escape sequences
        click.echo(f"impq-onnx: error: {path}: {message}{' ' if message.endswith('?') else '; '}see '{path} --help'",
                   err=True)


class OneLineGroup(click.Group):
    """The command group whose usage errors (a missing argument, a value click cannot parse, an unknown
    command) are one line like every other error; ``impq-onnx`` alone still prints its help."""

    @staticmethod
    def _one_line(error: click.UsageError) -> click.UsageError:
        if isinstance(error, (_OneLineUsageError, getattr(click.exceptions, "NoArgsIsHelpError", ()))):
            return error
        return _OneLineUsageError(error)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as error:
            raise self._one_line(error) from error

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as error:
            raise self._one_line(error) from error
