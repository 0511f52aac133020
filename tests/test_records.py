"""The declared records of results.json (`jaxunlearn.records`): the run-time check finds what
differs from them. (Every run the suite reads goes through `conftest.results_of`, which holds
its results.json to them.)"""

import copy
import json

import pytest

from jaxunlearn import records

_SCORE = {"test_accuracy": 0.5, "test_loss": 1.2, "members": 3}
_MEMBER = {"member": 0, "test_accuracy": 0.5, "test_loss": 1.2, "valid": True, "born": 1}
_RESULTS = {
    "complete": False, "config": {"preset": "smoke"}, "data_source": "sample", "n_train": 10,
    "n_test": 5, "member_parallel": "unroll", "device": "cpu", "backend": "cpu", "devices": 1,
    "processes": 1, "versions": {"python": "3", "jax": "0", "flax": "0", "optax": "0"},
    "data_fingerprint": "abc",
    "phases": [{"phase": 1, "working_set": 10, "seconds_by_model": {"ensemble": 1.0},
                "sample_size": 8, "ensemble": _SCORE, "aggregations": {"vote": {
                    "test_accuracy": 0.5, "test_loss": None, "members": 3}},
                "baseline": None, "deleted_ids": [], "invalidated": [],
                "members": [_MEMBER], "seconds": 2,
                "mia": {"ensemble": {"n": 0, "skipped": "too few"}}}]}


def _with(path, value):
    out = copy.deepcopy(_RESULTS)
    *head, last = path
    target = out
    for key in head:
        target = target[key]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return out


def test_a_conforming_record_has_no_problem():
    assert records.problems(_RESULTS) == []


@pytest.mark.parametrize("path, value, expected", [
    (("n_train",), KeyError, "results: no 'n_train' (Results)"),
    (("phases", 0, "ensemble", "test_accuracy"), "high",
     "results.phases[0].ensemble.test_accuracy: 'high' is not"),
    (("phases", 0, "working_set"), 10.5, "results.phases[0].working_set: 10.5 is not int"),
    (("phases", 0, "working_set"), True, "results.phases[0].working_set: True is not int"),
    (("phases", 0, "members", 0, "colour"), "red",
     "results.phases[0].members[0]: 'colour' is not a field of MemberScore"),
    (("phases", 0, "deleted_ids"), {"a": 1}, "results.phases[0].deleted_ids: dict, not a list"),
    (("phases", 0, "mia"), {"ensemble": 3}, "results.phases[0].mia.ensemble: int, not an object"),
    (("lineage_audit",), {"ok": True}, "results.lineage_audit: no 'deleted' (Audit)"),
])
def test_each_departure_is_named(path, value, expected):
    found = records.problems(_with(path, value))
    assert any(p.startswith(expected) for p in found), found


def test_optional_fields_and_nulls_where_declared():
    assert records.problems(_with(("phases", 0, "baseline"), _SCORE)) == []
    assert records.problems(_with(("phases", 0, "members", 0, "shadow"), True)) == []
    assert records.problems(_with(("phases", 0, "seconds"), 2.5)) == []  # int or float
    assert records.problems(_with(("phases", 0, "aggregations", "vote", "test_loss"), "x"))


def test_load_says_what_is_wrong(tmp_path):
    with pytest.raises(records.RecordError, match="does not exist"):
        records.load(tmp_path / "results.json")
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(records.RecordError, match="not readable JSON"):
        records.load(tmp_path / "results.json")
    (tmp_path / "results.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(records.RecordError, match="not a run's results"):
        records.load(tmp_path / "results.json")
    (tmp_path / "results.json").write_text(json.dumps(_RESULTS))
    assert records.load(tmp_path / "results.json") == _RESULTS
