"""The report tests share two finished tiny compress runs (the ``runs`` fixture, one per session)."""

from __future__ import annotations

import pytest
from report_runs import DATA, MODEL, TINY


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two finished runs, kernel and layer granularity: {granularity: CompressResult}."""
    if not MODEL.is_file():
        pytest.skip("the bundled Fashion-MNIST model is not built yet")
    from impq_onnx.compression import compress

    root = tmp_path_factory.mktemp("runs")
    return {g: compress(MODEL, DATA, output=root / f"{g}.onnx", progress=False, granularity=g, **TINY)
            for g in ("kernel", "layer")}
