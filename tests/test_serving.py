"""Serving deletion requests: a `forget` scores only what its request changed (the members'
logits are kept on disk between processes, matched by fingerprint, never with a deleted id's or
an invalidated member's scores, and the audit checks that); requests pending together are
applied as one deletion."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from jaxunlearn import auditing, deletion_log, driver, forgetting
from jaxunlearn.config import apply_overrides, get_preset
from jaxunlearn.folder import LOGITS


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if "seconds" not in str(k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _assert_close(a, b, where="record"):
    """Equal structures and values, floats to a relative 1e-9."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), where
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def shards(tmp_path_factory, sample):
    """A finished SISA run: a deleted id invalidates the one member whose shard holds it."""
    cfg = apply_overrides(get_preset("smoke"), {
        "plan": "shards", "fraction": 1.0, "slices": 2, "strategy": "rewind",
        "deletion_rate": 0.0, "oracle_reference": "none", "baseline": "none",
        "eval_every_epoch": False, "retain_eval": 200, "evaluators": "scores,mia"})
    out = tmp_path_factory.mktemp("saved") / "run"
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False)
    return out


def test_a_forget_scores_only_the_retrained_member_and_the_deleted_id(shards, sample, tmp_path):
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    shutil.copytree(shards, warm)
    shutil.copytree(shards, cold)
    (cold / LOGITS).unlink()  # as before: every member scored again in the new process
    assert (warm / LOGITS).exists()
    outcomes = {name: forgetting.forget(path, [17], log=lambda s: None, dataset=sample)
                for name, path in (("warm", warm), ("cold", cold))}
    record = outcomes["warm"]["record"]
    assert len(record["invalidated"]) == 1  # shards: one member held id 17
    n_test, members = 100, 3
    retain = record["retain"]["ensemble"]["n"]
    # Warm: the deleted id for every member before unlearning (the retain sample may swap one
    # id in), then the retrained member on the test, retain and forget sets; nothing else.
    assert outcomes["warm"]["timing"]["scored_rows"] <= 2 * members + n_test + retain + 1
    assert outcomes["cold"]["timing"]["scored_rows"] >= members * (n_test + retain)
    # The same scores either way (to float rounding: XLA:CPU may round a member's logits
    # differently when they are computed in a batch of another size).
    _assert_close(_strip(outcomes["warm"]["record"]), _strip(outcomes["cold"]["record"]))
    _assert_close(_strip(outcomes["warm"]["results"]["final"]),
                  _strip(outcomes["cold"]["results"]["final"]))
    ok, problems, _ = auditing.audit(warm)
    assert ok, problems
    with np.load(warm / LOGITS) as f:  # the deleted id's scores were not kept
        assert not any(17 in f[k] for k in f.files if k.endswith("/ids"))


def test_the_audit_fails_on_saved_logits_from_before_a_deletion(shards, sample, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shards, run)
    older = (run / LOGITS).read_bytes()  # scores of members the request will invalidate
    forgetting.forget(run, [23], log=lambda s: None, dataset=sample)
    assert auditing.audit(run)[0]
    (run / LOGITS).write_bytes(older)
    ok, problems, _ = auditing.audit(run)
    assert not ok and any("written with 0 id(s) deleted, not 1" in p for p in problems), problems


def test_the_retain_sample_changes_only_by_the_deleted_ids():
    from jaxunlearn import plans
    from jaxunlearn.evaluators import retain_ids

    cfg = apply_overrides(get_preset("smoke"), {"retain_eval": 50})
    chunks = plans.make_chunks(300, 3)
    deleted = np.zeros(300, bool)
    first = retain_ids(cfg, chunks, 3, deleted)
    assert len(first) == 50 and len(np.unique(first)) == 50
    deleted[first[:3]] = True
    second = retain_ids(cfg, chunks, 3, deleted)
    assert len(second) == 50 and not deleted[second].any()
    assert len(np.setdiff1d(first, second)) == 3  # the three deleted ones, replaced
    assert set(first[3:]) <= set(second)


def test_requests_pending_together_are_applied_as_one_deletion(shards, sample, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(shards, run)
    with deletion_log.DeletionLog.open(run) as log:  # arrived while the run was busy
        first = log.request([31], str(forgetting.Forget()))
        second = log.request([32], str(forgetting.Forget()))
    outcome = forgetting.forget(run, [33], log=lambda s: None, dataset=sample)
    assert outcome["status"] == "applied"
    results = outcome["results"]
    (record,) = results["requests"]
    assert record["together"] == [first, second, outcome["request"]] == [1, 2, 3]
    assert record["ids"] == [31, 32, 33] and outcome["record"] is record
    assert set(results["deleted_ids"]) == {31, 32, 33}
    # one replay for the members the three ids invalidate
    assert results["cost"]["events"] == 1 and results["cost"]["ids"] == 3
    records = deletion_log.DeletionLog.open(run).records()
    assert [r["outcome"] for r in records] == ["applied"] * 3
    assert all(r["members_invalidated"] == record["invalidated"] for r in records)
    assert "applied in one deletion with request(s) [2, 3]" in records[0]["message"]
    ok, problems, _ = auditing.audit(run)
    assert ok, problems


def test_the_serving_benchmark_splits_each_request_and_leaves_the_run_alone(shards, tmp_path):
    import sys

    from conftest import results_of

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import deletion_serving

    before = (shards / "results.json").read_bytes()
    out = tmp_path / "serving.json"
    assert deletion_serving.main([str(shards), "--requests", "2", "--seed", "1", "--data",
                                  "sample", "--out", str(out)]) == 0
    assert (shards / "results.json").read_bytes() == before  # served on a copy
    record = json.loads(out.read_text())
    assert len(record["rows"]) == 2 and record["summary"]["audit_ok"]
    for row in record["rows"]:
        t = row["seconds"]
        assert len(row["invalidated"]) == 1 and row["member_examples"] > 0
        assert t["retraining"] <= t["honoured"] <= t["wall"]
        # the spans are wired: its retrained member was scored, its checkpoint written
        assert t["scoring"] > 0 and t["checkpoint"] > 0 and t["scored_rows"] > 0
    assert record["summary"]["training_from_scratch_s"] == pytest.approx(
        deletion_serving.training_seconds(results_of(shards)))
