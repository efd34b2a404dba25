"""The ``impq-onnx`` command: a thin click layer over the library.

Options carry the same names as the library parameters they feed. User errors
(:class:`~impq_onnx.errors.ImpqError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import functools
import logging
import sys

import click

from .errors import ImpqError

__all__ = ["main"]


def _user_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ImpqError as exc:
            click.echo(f"impq-onnx: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _parse_shape(ctx, param, value):
    if value is None:
        return None
    try:
        shape = tuple(int(d) for d in value.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers, e.g. 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(f"'{value}' must contain positive sizes, e.g. 1,3,224,224")
    return shape


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="impq-onnx")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """impq-onnx: mixed-precision quantization of ONNX image classifiers (IMPQ)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-shape", callback=_parse_shape, help="Concrete input shape for MACs, e.g. 1,3,224,224.")
@click.option("--output", help="Name of the logits tensor when the model has several outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@_user_errors
def inspect_command(model: str, input_shape, output: str | None, as_json: bool) -> None:
    """Show the quantizable layers, weight groups and activation sites of MODEL."""
    from .frontend import load
    from .inspection import format_json, format_table
    from .sites import find_sites

    table = find_sites(load(model, output=output), input_shape=input_shape)
    click.echo(format_json(table, model) if as_json else format_table(table, model))


@main.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="ImageFolder tree (or one with test/ inside), or .npz.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Evaluate the model simulated under this plan.")
@click.option("--preprocess", help="Preset (imagenet, cifar, fashion-mnist) or a YAML file; default: from the input shape.")
@click.option("--output", help="Name of the logits tensor when the model has several outputs.")
@click.option("--batch-size", default=100, show_default=True)
@click.option("--limit-per-class", type=int, help="Use only the first N images of each class.")
@click.option("--threads", default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_user_errors
def evaluate_command(model, data, plan_path, preprocess, output, batch_size, limit_per_class, threads, as_json):
    """Top-1/top-5 accuracy of MODEL on DATA, agreement with the float model, and throughput."""
    import json

    from .data.model_data import open_for_model, split_folders
    from .engine import evaluate
    from .frontend import load
    from .plan import PrecisionPlan
    from .sites import find_sites

    canonical = load(model, output=output)
    train, held_out = split_folders(data)
    dataset = open_for_model(canonical, held_out or train, preprocess, limit_per_class=limit_per_class)
    plan = sites = None
    if plan_path:
        sites = find_sites(canonical)
        plan = PrecisionPlan.load(plan_path).validate(sites)
    result = evaluate(canonical, dataset.batches(batch_size), plan=plan, sites=sites,
                      float_model=canonical if plan is not None else None, threads=threads, progress=True)
    if as_json:
        click.echo(json.dumps({"model": model, "data": str(held_out or train), "plan": plan_path, **result.to_dict()}))
        return
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    click.echo(f"{model} on {held_out or train} ({result.n} images){' under ' + plan_path if plan_path else ''}")
    click.echo(f"  top-1 {pct(result.top1)}   top-5 {pct(result.top5)}"
               + (f"   agreement with float {pct(result.agreement)}" if result.agreement is not None else ""))
    click.echo(f"  throughput {result.images_per_second:.0f} images/s ({threads} threads, batch {batch_size})")
