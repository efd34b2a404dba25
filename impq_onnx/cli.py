"""The ``impq-onnx`` command: a thin click layer over the library.

Options carry the same names as the library parameters they feed. Errors print one line on stderr
and exit with the code of their cause (:mod:`impq_onnx.errors`: 2 user input, 5 environment, 1 a bug);
``verify`` exits with :data:`EXIT_VERIFY_FAILED` (3) when it ran but the lowered model is not what the float
model and plan give. ``-vv`` adds the traceback of the error and of every exception that caused it.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback

import click

from impq_onnx.errors import as_impq_error
from impq_onnx.lowering.targets import target_help, target_names

__all__ = ["main", "EXIT_VERIFY_FAILED"]

EXIT_VERIFY_FAILED = 3  # distinct from 2 (bad input): the check ran and found a difference


def _user_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
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


def _parse_shape(ctx, param, value):
    if value is None:
        return None
    try:
        shape = tuple(int(d) for d in value.replace("x", ",").split(","))
    except ValueError as exc:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of integers, e.g. 1,3,224,224") from exc
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


_SHAPE_HELP = "Concrete input shape for MACs and padding, e.g. 1,3,224,224 [default: the data's]."


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--input-shape", callback=_parse_shape, help="Concrete input shape for MACs, e.g. 1,3,224,224.")
@click.option("--output", help="Name of the logits tensor when the model has several outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@_user_errors
def inspect_command(model: str, input_shape, output: str | None, as_json: bool) -> None:
    """Show the quantizable layers, weight groups and activation sites of MODEL."""
    from impq_onnx.frontend.canonical import load
    from impq_onnx.frontend.inspection import format_json, format_table
    from impq_onnx.frontend.site_analysis import find_sites

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
@click.option("--threads", type=int, default=None, help="onnxruntime threads [default: the available cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--input-shape", callback=_parse_shape, help=_SHAPE_HELP)
@_user_errors
def evaluate_command(model, data, plan_path, preprocess, output, batch_size, limit_per_class, threads, as_json,
                     input_shape):
    """Top-1/top-5 accuracy of MODEL on DATA, agreement with the float model, and throughput."""
    import json

    from impq_onnx.option_checks import EVALUATE, check_numbers

    check_numbers(dict(batch_size=batch_size, limit_per_class=limit_per_class, threads=threads), EVALUATE, cli=True)

    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.engine import evaluate
    from impq_onnx.engine.evaluation import nonfinite_initializers
    from impq_onnx.frontend.canonical import load
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.frontend.site_analysis import find_sites

    canonical = load(model, output=output)
    for name, count in nonfinite_initializers(canonical)[:1]:
        click.echo(f"impq-onnx: warning: {model}: initializer '{name}' holds {count} NaN/infinite value(s); "
                   "its outputs will not be meaningful", err=True)
    dataset = open_model_data(canonical, data, preprocess, limit_per_class=limit_per_class).evaluation
    plan = sites = None
    if plan_path:
        sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
        plan = PrecisionPlan.load(plan_path).validate(sites)
    result = evaluate(canonical, dataset.batches(batch_size), plan=plan, sites=sites,
                      float_model=canonical if plan is not None else None, threads=threads, progress=True)
    if as_json:
        click.echo(json.dumps({"model": model, "data": dataset.name, "plan": plan_path, **result.to_dict()}))
        return
    pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    click.echo(f"{model} on {dataset.name} ({result.n} images){' under ' + plan_path if plan_path else ''}")
    agreement = f"agreement with float {pct(result.agreement)}" if result.agreement is not None else ""
    if result.top1 is None:
        click.echo(f"  no labels in the data: top-1/top-5 not measured{'; ' + agreement if agreement else ''}")
    else:
        click.echo(f"  top-1 {pct(result.top1)}   top-5 {pct(result.top5)}" + (f"   {agreement}" if agreement else ""))
    from impq_onnx.runtime import resolve_threads

    click.echo(f"  throughput {result.images_per_second:.0f} images/s ({resolve_threads(threads)} threads, "
               f"batch {batch_size})")


def _compress_options(func):
    """One ``--option-name`` per :class:`~impq_onnx.compression.CompressConfig` field (the same names)."""
    import dataclasses as _dc

    from impq_onnx.compression import CompressConfig

    for field in reversed([f for f in _dc.fields(CompressConfig) if f.name not in ("model",)]):
        flag = "--" + field.name.replace("_", "-")
        default = "none" if field.default is None else field.default
        help_text = field.metadata.get("help", "")
        if "[default" not in help_text:
            help_text += f" [default: {default}]"
        if field.type in (bool, "bool"):
            func = click.option(f"{flag}/--no-{flag[2:]}", field.name, default=None, help=help_text)(func)
        else:
            func = click.option(flag, field.name, default=None, metavar="VALUE", help=help_text)(func)
    return func




@main.command("sensitivity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="ImageFolder tree (train/ is used if present), or .npz.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), help="Measure the model simulated under this plan "
              "(its bits give the 2^-B factor).")
@click.option("--samples", default=256, show_default=True, help="Images to average over.")
@click.option("--granularity", type=click.Choice(["kernel", "layer", "network"]), default="kernel", show_default=True)
@click.option("--runner-ups", default=10, show_default=True, help="Runner-up classes S (capped at classes - 1).")
@click.option("--weighting", type=click.Choice(["paper", "reference", "step"]), default="paper", show_default=True)
@click.option("--method", type=click.Choice(["fast", "exact"]), default="fast", show_default=True)
@click.option("--preprocess", help="Preset or YAML file; default: from the input shape.")
@click.option("-o", "--output-prefix", type=click.Path(dir_okay=False),
              help="Write <prefix>.json and <prefix>.csv [default: <model stem>.sensitivity].")
@click.option("--top", default=5, show_default=True, help="How many layers to print at each end.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime threads [default: the available cores].")
@click.option("--input-shape", callback=_parse_shape, help=_SHAPE_HELP)
@_user_errors
def sensitivity_command(model, data, plan_path, samples, granularity, runner_ups, weighting, method, preprocess,
                        output_prefix, top, seed, threads, input_shape):
    """Noise-gain sensitivity of every weight group and activation site of MODEL (IMPQ eq. 4-5)."""
    from pathlib import Path

    from impq_onnx.option_checks import SENSITIVITY, check_numbers

    check_numbers(dict(samples=samples, runner_ups=runner_ups, top=top, seed=seed, threads=threads), SENSITIVITY,
                  cli=True)

    from impq_onnx.files import write_all
    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.frontend.canonical import load
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.sensitivity import noise_gain
    from impq_onnx.quant.simulate import simulate
    from impq_onnx.frontend.site_analysis import find_sites

    from impq_onnx.data.prefetch import Prefetch
    from impq_onnx.runtime import resolve_threads

    canonical = load(model)
    # Only the measured images are decoded (on every core, ahead of the gradients in a prefetch thread); a
    # broken one among them is the same one-line error the up-front check would give.
    dataset = open_model_data(canonical, data, preprocess, check=False, workers=resolve_threads(threads)).train_all
    sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
    plan = PrecisionPlan.load(plan_path).validate(sites) if plan_path else None
    if samples < len(dataset):  # a seeded, class-blind random subset of exactly `samples` images
        import numpy as np

        dataset = dataset.subset(np.sort(np.random.default_rng(seed).choice(len(dataset), samples, replace=False)))
    measured = simulate(canonical, plan, sites) if plan is not None else canonical
    with Prefetch(dataset.batches(64)) as batches:
        table = noise_gain(measured, sites, batches, plan=plan, granularity=granularity, runner_ups=runner_ups,
                           weighting=weighting, method=method, samples=samples, seed=seed, threads=threads)
    prefix = Path(output_prefix) if output_prefix else Path(Path(model).stem + ".sensitivity")
    json_path, csv_path = Path(f"{prefix}.json"), Path(f"{prefix}.csv")
    write_all({json_path: table.to_json(), csv_path: table.to_csv()})
    layer_m: dict[str, float] = {}
    for name, value in table.weights.items():
        layer = name.rpartition("/")[0] if granularity == "kernel" else name
        layer_m[layer] = layer_m.get(layer, 0.0) + value
    ranked = sorted(layer_m.items(), key=lambda kv: (-kv[1], kv[0]))
    click.echo(f"{model}: noise gain over {table.n_samples} images ({weighting} weighting, {method}, "
               f"{table.seconds:.1f} s, {table.ties} ties skipped)")
    click.echo("most sensitive layers (sum of kernel M):")
    for name, value in ranked[:top]:
        click.echo(f"  {value:12.4e}  {name}")
    click.echo("least sensitive layers:")
    for name, value in ranked[::-1][:top]:
        click.echo(f"  {value:12.4e}  {name}")
    acts = [name for name, _ in table.ranked("activations")]
    shown = acts if len(acts) <= 2 * top else acts[:top] + ["..."] + acts[-top:]
    click.echo(f"activation sites, most to least sensitive: {', '.join(shown)}")
    click.echo(f"wrote {json_path} and {csv_path}")


@main.command("lower")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False), help="Precision plan (YAML/JSON).")
@click.option("-o", "--output-path", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--format", "format_", type=click.Choice(target_names()), default="qdq", show_default=True,
              help=target_help())
@click.option("--output", help="Name of the logits tensor when the model has several outputs.")
@click.option("--input-shape", callback=_parse_shape, help=_SHAPE_HELP.replace("the data's", "224 for a dynamic size"))
@click.option("--encodings-version", type=click.Choice(["0.6.1", "1.0.0", "2.0.0"]), default="0.6.1", show_default=True,
              help="AIMET encodings version (--format encodings).")
@click.option("--static-batch", type=click.IntRange(min=1), help="Fix the batch dimension of the model's input and "
              "output to N (QONNX tools need static shapes).")
@_user_errors
def lower_command(model, plan_path, output_path, format_, output, input_shape, encodings_version, static_batch):
    """Write MODEL quantized under PLAN (any plan, also a hand-edited one) plus its <out>.bits.json sidecar."""
    from impq_onnx.lowering.lower import lower_file

    for path in lower_file(model, plan_path, output_path, format_, output=output, input_shape=input_shape,
                           encodings_version=encodings_version, static_batch=static_batch):
        click.echo(f"wrote {path}")


@main.command("verify")
@click.argument("lowered", type=click.Path(dir_okay=False))
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="The float model the plan applies to (compress writes it as <stem>.float.onnx).")
@click.option("--plan", "plan_path", required=True, type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Images to compare the outputs on.")
@click.option("--preprocess", help="Preset or YAML file; default: from the input shape.")
@click.option("--limit-per-class", type=int, help="Use only the first N images of each class.")
@click.option("--threads", type=int, default=None, help="onnxruntime threads [default: the available cores].")
@click.option("--logit-tolerance", default=0.0, show_default=True, type=float,
              help="Largest logit difference from the simulation accepted (0: exact, as the pinned onnxruntime "
                   "gives).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--input-shape", callback=_parse_shape, help=_SHAPE_HELP)
@_user_errors
def verify_command(lowered, model_path, plan_path, data, preprocess, limit_per_class, threads, logit_tolerance,
                   as_json, input_shape):
    """Check LOWERED against MODEL under PLAN: every code, scale and zero point, predictions, ranges, annotations.

    Exits 0 when everything agrees, 3 on any difference (the first of each tensor is printed), 2 on bad input.
    """
    import json

    from impq_onnx.option_checks import VERIFY, check_numbers

    check_numbers(dict(limit_per_class=limit_per_class, threads=threads, logit_tolerance=logit_tolerance), VERIFY,
                  cli=True)

    from impq_onnx.data.model_data import open_model_data
    from impq_onnx.frontend.canonical import load
    from impq_onnx.lowering.lower import read_lowered
    from impq_onnx.quant.plan import PrecisionPlan
    from impq_onnx.frontend.site_analysis import find_sites
    from impq_onnx.lowering.verify import verify

    canonical = load(model_path)
    dataset = open_model_data(canonical, data, preprocess, limit_per_class=limit_per_class).evaluation
    sites = find_sites(canonical, input_shape or (1, *dataset.sample_shape))
    plan = PrecisionPlan.load(plan_path).validate(sites)
    result = verify(read_lowered(lowered), canonical, plan, sites, dataset.batches(100), threads=threads,
                    logit_tolerance=logit_tolerance)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(f"{lowered}: {'OK' if result.ok else 'FAILED'} over {result.samples} images: "
                   f"top-1 agreement with the simulation {100 * result.agreement:.2f} %, "
                   f"max logit difference {result.max_logit_diff:.3g}")
        for problem in ([result.checker_error] if result.checker_error else []) + result.range_violations \
                + result.record_mismatches:
            click.echo(f"  {problem}")
    if not result.ok:
        sys.exit(EXIT_VERIFY_FAILED)


@main.command("compress")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--config", "config", type=click.Path(dir_okay=False),
              help="YAML file of options (keys as below, with _ or -); options given here override it.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@_compress_options
@_user_errors
def compress_command(model, config, quiet, **options) -> None:
    """IMPQ mixed-precision search: lower the bits of the least sensitive groups, fine-tune, repeat.

    Writes the model, <stem>.plan.yaml, <stem>.report.json and <stem>.config.yaml; checkpoints go to
    the work dir after every iteration (--resume continues a killed run).
    """
    from impq_onnx.compression import compress

    compress(model, config=config, progress=not quiet, **options)


@main.command("report")
@click.argument("work_dirs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output-html", required=True, type=click.Path(dir_okay=False),
              help="The HTML file to write; the PNG figures go beside it as <stem>.<figure>.png.")
@_user_errors
def report_command(work_dirs, output_html) -> None:
    """HTML report (bits per layer, accuracy vs bits, sensitivity, summary) of the compress runs in WORK_DIRS.

    Several work dirs (e.g. one run per granularity) add the compression-ratio vs accuracy comparison.
    """
    from impq_onnx.report import write_report

    for path in write_report(list(work_dirs), output_html):
        click.echo(f"wrote {path}")
