"""The typed search state writes the files earlier versions wrote, byte for byte, and reads them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from impq_onnx.quant.plan import PrecisionPlan
from impq_onnx.search.checkpoint import STATE_VERSION, WorkDir
from impq_onnx.search.state import FINAL_KEYS, IterationRecord, SearchState

V1 = Path(__file__).parent / "data" / "v1"
METHODS = ("impq", "faq", "activation-density", "uniform-ptq")


@pytest.mark.parametrize("method", METHODS)
def test_records_keep_the_report_key_order_and_values(method):
    text = (V1 / f"{method}.iterations.json").read_text()
    records = [IterationRecord.from_dict(r) for r in json.loads(text)]
    assert json.dumps([r.to_dict() for r in records], indent=1, allow_nan=True) + "\n" == text
    assert all(r.within_accuracy_drop is not None for r in records) and records[-1].stop is not None


def test_method_fields_stay_in_extra_in_their_order():
    faq = [IterationRecord.from_dict(r) for r in json.loads((V1 / "faq.iterations.json").read_text())]
    assert list(faq[0].extra) == ["lr_start", "lr_end", "faq_weight_steps", "activation_steps"]
    assert list(faq[1].extra) == ["lr_start", "lr_end"]
    impq = [IterationRecord.from_dict(r) for r in json.loads((V1 / "impq.iterations.json").read_text())]
    assert all(not r.extra for r in impq) and [r.phase_end for r in impq].count("max_iterations") == 2


@pytest.mark.parametrize("method", METHODS)
def test_a_committed_state_of_an_older_version_is_rewritten_byte_for_byte(tmp_path, method):
    original = (V1 / f"{method}.state.json").read_bytes()
    data = json.loads(original)
    assert data["version"] == STATE_VERSION
    state = SearchState.from_dict(data, PrecisionPlan({}, {}, {}), {})
    work = WorkDir(tmp_path)
    state.commit(work, data["reference"])
    assert work.state_path.read_bytes() == original
    assert state.record(state.final).final_metrics() == {k: data["records"][state.final][k] for k in FINAL_KEYS}


def test_a_record_without_a_field_names_it():
    row = json.loads((V1 / "uniform-ptq.iterations.json").read_text())[0]
    del row["val_n"]
    with pytest.raises(KeyError, match="val_n"):
        IterationRecord.from_dict(row)
