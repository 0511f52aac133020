"""Unlearning strategies (replace, rewind, oracle), the shards plan, evaluation and cost."""

import json

import jax
import numpy as np
import pytest

from jaxunlearn import data, experiment
from jaxunlearn.config import ConfigError, apply_overrides, get_preset


@pytest.fixture(scope="module")
def sample():
    return data.load_sample()


def _cfg(**changes):
    return apply_overrides(get_preset("smoke"), {"eval_every_epoch": False, "baseline": "none",
                                                 **changes})


def _schedule(tmp_path, schedule):
    path = tmp_path / "deletions.json"
    path.write_text(json.dumps(schedule))
    return str(path)


def _run(cfg, tmp_path, sample, name="run"):
    exp = experiment.prepare(cfg, tmp_path / name, dataset=sample, log=lambda s: None,
                             progress=False)
    try:
        for phase in range(1, cfg.phases + 1):
            exp.run_phase(phase)
        results = exp.finish(1.0)
    finally:
        exp.close()
    return exp, results


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_rewind_restores_exactly_the_state_before_the_deleted_id_entered(tmp_path, sample):
    cfg = _cfg(strategy="rewind", deletion_rate=0.0)
    # Run A: two phases, then find an id of chunk 2 (it entered in phase 2) that a member saw.
    a = experiment.prepare(cfg, tmp_path / "a", dataset=sample, log=lambda s: None)
    a.run_phase(1)
    a.run_phase(2)
    chunk2 = a.chunks[1]
    seen = a.ens.lineage.seen[:, chunk2]
    member = int(np.flatnonzero(seen.any(axis=1))[0])
    ids = chunk2[seen[member]][:1]
    invalid = a.ens.lineage.invalid(ids)
    points = a.rewind_points(ids, invalid)
    assert (points[invalid] == 1).all() and (points[~invalid] == -1).all()
    a.restore(points)
    # Run B: the same run stopped after phase 1, before the id entered.
    b = experiment.prepare(cfg, tmp_path / "b", dataset=sample, log=lambda s: None)
    b.run_phase(1)
    got, want = a.ens.host_state(), b.ens.host_state()
    # Everything but the optimiser state, which the replay resets at the start of the phase.
    got, want = got._replace(opt_state=None), want._replace(opt_state=None)
    assert len(jax.tree.leaves(got)) > 10
    for leaf_a, leaf_b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(leaf_a[invalid], leaf_b[invalid])
    np.testing.assert_array_equal(a.ens.lineage.seen[invalid], b.ens.lineage.seen[invalid])
    a.close()
    b.close()


@pytest.mark.parametrize("strategy", ["replace", "rewind", "oracle"])
def test_no_live_lineage_holds_a_deleted_id(tmp_path, sample, strategy):
    schedule = {"1": [3, 40], "2": [150, 7], "3": list(range(200, 230))}
    cfg = _cfg(strategy=strategy, deletions=_schedule(tmp_path, schedule), fraction=0.5)
    exp, results = _run(cfg, tmp_path, sample)
    deleted = sorted(sum(schedule.values(), []))
    assert results["deleted_ids"] == deleted
    assert not exp.ens.lineage.seen[:, deleted].any()
    assert results["lineage_audit"]["ok"] and results["lineage_audit"]["violations"] == 0
    if strategy == "rewind":  # no kept snapshot holds a deleted id either
        assert results["lineage_audit"]["snapshot_violations"] == 0
        assert all(not seen[:, deleted].any() for _, seen in exp.snapshots.values())
    assert results["forget"]["ensemble"]["n"] == len(deleted)
    for block in ("forget", "retain", "test"):
        assert {"ensemble", "oracle"} <= set(results[block])
        assert 0.0 <= results[block]["ensemble"]["accuracy"] <= 1.0
    mia = results["mia"]["ensemble"]
    assert 0.0 <= mia["logistic"]["auc"] <= 1.0 and mia["n"] == len(deleted)
    assert "ensemble_before_last_deletion" in results["mia"]


def test_rewind_equals_the_oracle_bit_for_bit(tmp_path, sample):
    """A member rewound to a clean state and replayed sees exactly the oracle's batches."""
    schedule = {"1": [3, 40], "2": [150, 7]}
    cfg = _cfg(strategy="rewind", deletions=_schedule(tmp_path, schedule), fraction=0.5)
    exp, results = _run(cfg, tmp_path, sample)
    assert results["cost"]["member_epochs"] > 0
    assert exp.oracle is not None and _same(exp.ens.host_params(), exp.oracle.host_params())
    assert results["test"]["ensemble"] == results["test"]["oracle"]


def test_oracle_with_nothing_deleted_equals_the_plain_run(tmp_path, sample):
    cfg = _cfg(deletion_rate=0.0)
    exp = experiment.prepare(cfg, tmp_path / "run", dataset=sample, log=lambda s: None)
    for phase in range(1, cfg.phases + 1):
        exp.run_phase(phase)
    oracle, cost = exp.train_oracle(cfg.phases)
    exp.close()
    assert cost["member_epochs"] == exp.cfg.members * exp.cfg.phases * exp.cfg.epochs
    assert _same(exp.ens.host_state(), oracle.host_state())


@pytest.mark.parametrize("strategy", ["replace", "rewind"])
def test_retraining_is_reproducible(tmp_path, sample, strategy):
    schedule = {"1": [3], "3": list(range(200, 220))}
    cfg = _cfg(strategy=strategy, deletions=_schedule(tmp_path, schedule), fraction=0.5,
               oracle_reference="none")
    first, r1 = _run(cfg, tmp_path, sample, "first")
    second, r2 = _run(cfg, tmp_path, sample, "second")
    assert r1["cost"]["member_epochs"] > 0
    assert _same(first.ens.host_state(), second.ens.host_state())
    assert r1["final"]["ensemble"] == r2["final"]["ensemble"]
    assert r1["final"]["members"] == r2["final"]["members"]


def test_costs_add_up(tmp_path, sample):
    schedule = {"1": [3, 40], "2": [150, 7], "3": [250]}
    cfg = _cfg(strategy="rewind", deletions=_schedule(tmp_path, schedule), fraction=0.5,
               epochs=2)
    exp, results = _run(cfg, tmp_path, sample)
    events = [p["cost"] for p in results["phases"] if "cost" in p]
    total = results["cost"]
    assert len(events) == total["events"] == 3
    for key in ("member_epochs", "member_examples", "ids", "invalidated_observed"):
        assert total[key] == sum(e[key] for e in events)
    for e, phase in zip(events, (1, 2, 3)):
        # rewind: each invalid member replays the stages after its rewind point.
        assert e["member_epochs"] == sum((phase - p) * cfg.epochs for p in e["rewound_to"].values())
        assert e["oracle"]["member_epochs"] == cfg.members * phase * cfg.epochs
        assert e["invalidated_observed"] == len(e["rewound_to"])
        assert 0 <= e["invalidated_expected"] <= cfg.members
        if e["member_examples"]:
            assert e["speedup_vs_oracle"] == e["oracle"]["member_examples"] / e["member_examples"]
    assert total["training"]["member_epochs"] == cfg.members * cfg.phases * cfg.epochs
    assert total["speedup_vs_oracle"] == (total["oracle"]["member_examples"]
                                          / total["member_examples"])


def test_shards_with_slices_rewind_and_vote(tmp_path, sample):
    schedule = {"1": [3, 40], "2": [150]}
    cfg = _cfg(plan="shards", fraction=1.0, slices=2, strategy="rewind", aggregation="vote",
               deletions=_schedule(tmp_path, schedule))
    exp, results = _run(cfg, tmp_path, sample)
    seen = exp.ens.lineage.seen
    assert (seen.sum(axis=0) <= 1).all()  # shards are disjoint: each id in at most one member
    assert seen.any(axis=1).all()
    for p in results["phases"]:
        if "cost" in p:  # with disjoint shards the expected count is exact
            assert p["cost"]["invalidated_expected"] == p["cost"]["invalidated_observed"]
    assert len(exp.snapshots) == 1 + cfg.phases * cfg.slices
    assert results["lineage_audit"]["ok"]
    assert _same(exp.ens.host_params(), exp.oracle.host_params())


def test_fair_baseline_is_unlearned_by_oracle(tmp_path, sample):
    schedule = {"1": [3], "2": [150]}
    cfg = _cfg(baseline="tiny", baseline_plan="full", baseline_unlearning="oracle",
               deletions=_schedule(tmp_path, schedule))
    exp, results = _run(cfg, tmp_path, sample)
    # Trained on the whole working set, the baseline holds every id: each deletion retrains it.
    base = [p["cost"]["baseline"] for p in results["phases"] if "cost" in p]
    assert [b["member_epochs"] for b in base] == [1 * cfg.epochs, 2 * cfg.epochs]
    assert all(b["unlearning"] == "oracle" and b["invalidated"] for b in base)
    assert results["baseline_deleted_ids_in_lineage"] == 0
    assert "baseline" in results["forget"] and "baseline" in results["mia"]


def test_membership_inference_sees_a_memorised_set(tmp_path, sample):
    forget = list(range(16))
    cfg = _cfg(phases=1, train_limit=32, members=1, plan="subset", fraction=1.0, epochs=40,
               batch_size=16, deletions=_schedule(tmp_path, {"1": forget}),
               oracle_reference="none")
    exp, results = _run(cfg, tmp_path, sample)
    before = results["phases"][0]["mia"]["ensemble_before"]
    assert before["n"] == 16
    assert before["threshold"]["auc"] > 0.8 and before["logistic"]["auc"] > 0.8


@pytest.mark.parametrize("changes, message", [
    ({"plan": "shards"}, "set fraction=1"),
    ({"slices": 2}, "needs plan=shards"),
    ({"plan": "shards", "fraction": 1.0, "members": 200}, "leaves a member no data"),
    ({"strategy": "retrain"}, "unknown unlearning strategy"),
    ({"oracle_reference": "always"}, "unknown oracle_reference"),
    ({"baseline_plan": "half"}, "unknown baseline_plan"),
    ({"mia_folds": 1}, "mia_folds must be at least 2"),
])
def test_bad_strategy_settings_fail_before_writing(tmp_path, sample, changes, message):
    with pytest.raises(ConfigError, match=message):
        experiment.run(_cfg(**changes), tmp_path / "run", dataset=sample)
    assert not (tmp_path / "run").exists()
