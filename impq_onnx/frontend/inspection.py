"""``impq-onnx inspect``: the site table of a model as a readable table or JSON."""

from __future__ import annotations

import json

from impq_onnx.frontend.sites import SiteTable

__all__ = ["inspection_dict", "format_table", "format_json"]


def inspection_dict(table: SiteTable, source: str) -> dict:
    """The JSON form of a site table: per layer rows, activation sites and totals."""
    sites = {site.tensor: site for site in table.activations}
    layers = []
    for layer in table.layers:
        site = sites[layer.activation]
        layers.append({
            "name": layer.node,
            "op": layer.op_type,
            "weight": layer.weight,
            "weight_shape": list(layer.weight_shape),
            "kernel_axis": layer.kernel_axis,
            "kernels": layer.kernels,
            "groups": layer.conv_groups,
            "params": layer.params,
            "dot_length": layer.dot_length,
            "macs": layer.macs,
            "bias": layer.bias,
            "activation": layer.activation,
            "activation_elements": site.elements,
            "activation_unsigned": site.unsigned,
            "activation_clip": site.batchnorm.clip if site.batchnorm else None,
            "batchnorm": layer.batchnorm.node if layer.batchnorm else None,
        })
    activations = [{
        "tensor": site.tensor,
        "layers": list(site.layers),
        "shape": list(site.shape),
        "elements": site.elements,
        "producer": site.producer,
        "unsigned": site.unsigned,
        "batchnorm": site.batchnorm.node if site.batchnorm else None,
        "clip": site.batchnorm.clip if site.batchnorm else None,
    } for site in table.activations]
    return {
        "model": source,
        "input": table.input_name,
        "input_shape": list(table.input_shape),
        "logits": table.logits,
        "layers": layers,
        "activations": activations,
        "totals": {
            "layers": len(table.layers),
            "kernels": sum(layer.kernels for layer in table.layers),
            "params": table.total_params,
            "macs": table.total_macs,
            "activation_sites": len(table.activations),
            "activation_elements": sum(site.elements for site in table.activations),
        },
    }


def format_json(table: SiteTable, source: str) -> str:
    return json.dumps(inspection_dict(table, source), indent=2, sort_keys=False)


def _human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def format_table(table: SiteTable, source: str) -> str:
    data = inspection_dict(table, source)
    header = ("layer", "op", "kernels", "params", "MACs", "activation", "bn")
    rows = []
    for row in data["layers"]:
        op = row["op"]
        if row["groups"] > 1:
            op += " dw" if row["groups"] == row["kernels"] else f" g{row['groups']}"
        sign = "+" if row["activation_unsigned"] else "±"
        rows.append((
            _clip(row["name"], 32), op, str(row["kernels"]), _human(row["params"]), _human(row["macs"]),
            _clip(f"{row['activation']} {sign}", 28), _clip(row["batchnorm"] or "-", 20),
        ))
    totals = data["totals"]
    rows.append(("total", "", str(totals["kernels"]), _human(totals["params"]), _human(totals["macs"]),
                 f"{totals['activation_sites']} sites", ""))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    numeric = {2, 3, 4}

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    shape = ",".join(map(str, data["input_shape"]))
    out = [f"{source}: input {data['input']} [{shape}], logits {data['logits']}", line(header), rule]
    out += [line(r) for r in rows[:-1]] + [rule, line(rows[-1])]
    out.append(f"{totals['layers']} layers, {totals['params']:,} weights, {totals['macs']:,} MACs per sample "
               "(activation: + unsigned, ± signed)")
    return "\n".join(out)
