"""Unlearning strategies (replace, rewind, oracle), the shards plan, evaluation and cost,
checked through a run's public outputs: results.json, lineage.npz and its checkpoints."""

import json

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_same_models, checkpoint_tree, group_state, results_of, rows
from jaxunlearn import checkpoint, driver, plans, strategies
from jaxunlearn.config import ConfigError, apply_overrides, get_preset
from jaxunlearn.group import compile_group
from jaxunlearn.snapshots import SnapshotStore
from jaxunlearn.stages import unpack_ragged


def _cfg(**changes):
    return apply_overrides(get_preset("smoke"), {"eval_every_epoch": False, "baseline": "none",
                                                 **changes})


def _schedule(tmp_path, schedule):
    path = tmp_path / f"deletions-{abs(hash(json.dumps(schedule)))}.json"
    path.write_text(json.dumps(schedule))
    return str(path)


def _run(cfg, tmp_path, sample, name="run", **kwargs):
    out = tmp_path / name
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False,
                              **kwargs)
    return out, results_of(out)  # as written (JSON: member keys are strings)


def _hand_trained(cfg, run_dir, sample, deleted) -> dict:
    """Every member trained by hand, outside the driver, from the run's initial state
    (checkpoint 0) on each recorded stage's samples minus ``deleted``, in the documented batch
    order (member i's epoch e of stage t shuffled by default_rng([seed, 0, t, 0, e, i])),
    with a fresh optimiser state at each phase's first stage. The independent reference the
    oracle and rewind must equal."""
    fns = compile_group(cfg.model, cfg.stem, cfg.precision, cfg.optimizer, cfg.learning_rate,
                        cfg.weight_decay, cfg.member_parallel, cfg.augment, 1)
    template = fns.init(jax.random.PRNGKey(0), cfg.members)  # the structure only
    state = jax.tree.map(jnp.asarray, flax.serialization.from_state_dict(
        template, group_state(run_dir, step=0)))
    ds = sample.limit(cfg.train_limit, cfg.test_limit)
    images = jnp.asarray(np.concatenate([ds.train_images, ds.test_images]))
    labels = jnp.asarray(np.concatenate([ds.train_labels, ds.test_labels]))
    mask = np.zeros(ds.n_train, bool)
    mask[list(deleted)] = True
    recorded = checkpoint_tree(run_dir)["stages"]["recorded"]["ensemble"]
    for t in sorted(recorded, key=int):
        samples = [s[~mask[s]] for s in unpack_ragged(recorded[t]["samples"])]
        if recorded[t]["slice"] == 1:
            state = state._replace(opt_state=jax.vmap(fns.tx.init)(state.params))
        for epoch in range(1, cfg.epochs + 1):
            steps = max(-(-max(len(s) for s in samples) // cfg.batch_size), 1)
            idx = np.zeros((cfg.members, steps * cfg.batch_size), np.int32)
            weight = np.zeros_like(idx, np.float32)
            for i, s in enumerate(samples):
                order = np.random.default_rng([cfg.seed, 0, int(t), 0, epoch, i]).permutation(s)
                idx[i, :len(s)], weight[i, :len(s)] = order, 1.0
            idx = idx.reshape(cfg.members, steps, -1)
            weight = weight.reshape(cfg.members, steps, -1)
            for k in range(steps):
                state, _ = fns.step(state, images, labels, idx[:, k], weight[:, k],
                                    jnp.ones(cfg.members, bool))
    return {"params": jax.tree.map(np.asarray, state.params),
            "batch_stats": jax.tree.map(np.asarray, state.batch_stats)}


def test_rewind_restores_exactly_the_state_before_the_deleted_id_entered(tmp_path, sample):
    cfg = _cfg(strategy="rewind", deletion_rate=0.0, keep_checkpoints=20)
    after_2, _ = _run(cfg, tmp_path, sample, "after-phase-2", stop_after_phase=2)
    # Its checkpoint at the end of phase 1 (every checkpoint is kept): the state to go back to.
    ckpts = checkpoint.Checkpoints(after_2, read_only=True)
    try:
        progress = {step: ckpts.load_meta(step)["tree"]["progress"] for step in ckpts.steps()}
        (phase_1,) = [step for step, p in progress.items()
                      if p["phase_done"] == 1 and p["position"] is None]
    finally:
        ckpts.close()
    # An id of chunk 2 (it entered in phase 2) that some member saw.
    chunk2 = plans.make_chunks(cfg.train_limit, cfg.phases)[1]
    seen = checkpoint_tree(after_2)["groups"]["ensemble"]["lineage"]["seen"]
    member = int(np.flatnonzero(seen[:, chunk2].any(axis=1))[0])
    ids = chunk2[seen[member, chunk2]][:1]
    invalid = seen[:, ids].any(axis=1)
    run, results = _run(_cfg(strategy="rewind", keep_checkpoints=20,
                             deletions=_schedule(tmp_path, {"2": ids.tolist()})),
                        tmp_path, sample, "deleted-after-phase-2")
    cost = results["phases"][1]["cost"]
    assert results["phases"][1]["invalidated"] == np.flatnonzero(invalid).tolist()
    assert cost["rewound_to"] == {str(i): 1 for i in np.flatnonzero(invalid)}
    # What each invalid member was rewound to is its state at the end of phase 1, exactly:
    # the stage-1 snapshot on disk, as the checkpoint after the deletion names it.
    stage1 = checkpoint_tree(run, step=2)["strategies"]["ensemble"]["stages"]["1"]
    want = group_state(after_2, step=phase_1)
    store = SnapshotStore(run, read_only=True)
    for i in np.flatnonzero(invalid):
        name, _, row = stage1["files"][i].partition("#")  # one snapshot per stage, a row each
        snapshot = store.read(name)[row]["state"]
        assert set(snapshot) == {"params", "batch_stats", "step", "key"}  # optimiser: reset
        for part in snapshot:
            jax.tree.map(np.testing.assert_array_equal, snapshot[part],
                         rows(want[part], i))
    np.testing.assert_array_equal(stage1["seen"][invalid],
                                  checkpoint_tree(after_2, phase_1)["groups"]["ensemble"]
                                  ["lineage"]["seen"][invalid])
    assert not stage1["seen"][:, ids].any()


@pytest.mark.parametrize("strategy", ["replace", "rewind", "oracle"])
def test_no_live_lineage_holds_a_deleted_id(tmp_path, sample, strategy):
    schedule = {"1": [3, 40], "2": [150, 7], "3": list(range(200, 230))}
    cfg = _cfg(strategy=strategy, deletions=_schedule(tmp_path, schedule), fraction=0.5)
    run, results = _run(cfg, tmp_path, sample)
    deleted = sorted(sum(schedule.values(), []))
    assert results["deleted_ids"] == deleted
    saved = np.load(run / "lineage.npz")
    assert saved["deleted"].tolist() == deleted and not saved["lineage"][:, deleted].any()
    assert results["lineage_audit"]["ok"] and results["lineage_audit"]["violations"] == 0
    if strategy == "rewind":  # no kept snapshot holds a deleted id either
        stages = checkpoint_tree(run)["strategies"]["ensemble"]["stages"]
        assert results["lineage_audit"]["snapshot_violations"] == 0
        assert len(stages) == 1 + cfg.phases
        assert all(not s["seen"][:, deleted].any() for s in stages.values())
        # every snapshot on disk is one that a stage of the ensemble or of the oracle reference
        # names (so its lineage, checked above and by the audit, holds no deleted id)
        tree = checkpoint_tree(run)
        entries = {f for s in stages.values() for f in s["files"] if f}
        assert len(entries) == cfg.members * cfg.phases  # a row per member and stage
        named = {f.split("#")[0] for f in entries}
        reference = tree["reference"]["strategy"]["stages"]
        assert all(not s["seen"][:, deleted].any() for s in reference.values())
        named |= {f.split("#")[0] for s in reference.values() for f in s["files"] if f}
        assert SnapshotStore(run).names() == named
    assert results["forget"]["ensemble"]["n"] == len(deleted)
    for phase in results["phases"]:  # before and after unlearning: the same example sets
        for block in ("forget", "retain", "test"):
            assert phase[block]["ensemble_before"]["n"] == phase[block]["ensemble"]["n"]
        assert phase["retain"]["ensemble"]["n"] == phase["working_set"] - len(
            phase["deleted_ids"])
    for block in ("forget", "retain", "test"):
        assert {"ensemble", "oracle"} <= set(results[block])
        score = results[block]["ensemble"]
        hits = score["accuracy"] * score["n"]  # an accuracy over the block's n examples
        assert score["n"] > 0 and abs(hits - round(hits)) < 1e-6
    mia = results["mia"]["ensemble"]
    assert mia["n"] == len(deleted)
    assert mia["logistic"]["auc"] == pytest.approx(np.mean(mia["logistic"]["per_fold"]["auc"]))
    assert "ensemble_before_last_deletion" in results["mia"]


@pytest.mark.parametrize("settings", [{}, {"plan": "shards", "fraction": 1.0, "slices": 2}],
                         ids=["bootstrap", "shards-slices"])
def test_rewind_and_oracle_equal_members_trained_by_hand(tmp_path, sample, settings):
    """Rewind and the oracle share the replay path; a member trained by hand on the stage
    samples without the deleted ids is the reference neither can share a bug with."""
    schedule = {"1": [3, 40], "2": [150, 7]}
    finals = {}
    for strategy in ("rewind", "oracle"):
        cfg = _cfg(strategy=strategy, deletions=_schedule(tmp_path, schedule),
                   keep_checkpoints=20, **({"fraction": 0.5} | settings))
        run, results = _run(cfg, tmp_path, sample, strategy)
        assert results["cost"]["member_epochs"] > 0
        finals[strategy] = group_state(run)
    reference = _hand_trained(cfg, run, sample, sum(schedule.values(), []))
    assert_same_models(finals["rewind"], reference)
    assert_same_models(finals["oracle"], reference)


def test_rewind_equals_its_oracle_reference_in_the_results(tmp_path, sample):
    schedule = {"1": [3, 40], "2": [150, 7]}
    cfg = _cfg(strategy="rewind", deletions=_schedule(tmp_path, schedule), fraction=0.5)
    _, results = _run(cfg, tmp_path, sample)
    assert results["cost"]["member_epochs"] > 0
    for block in ("forget", "retain", "test"):
        assert results[block]["ensemble"] == results[block]["oracle"]


def test_oracle_with_nothing_left_to_unlearn_equals_the_plain_run(tmp_path, sample):
    plain, _ = _run(_cfg(deletion_rate=0.0), tmp_path, sample, "plain")
    unseen = np.flatnonzero(~np.load(plain / "lineage.npz")["lineage"].any(axis=0))
    schedule = _schedule(tmp_path, {"3": unseen[:1].tolist()})
    # The oracle strategy: no member saw the id, so there is nothing to retrain.
    run, results = _run(_cfg(strategy="oracle", deletions=schedule), tmp_path, sample, "oracle")
    (event,) = [p["cost"] for p in results["phases"] if "cost" in p]
    assert event["member_epochs"] == 0 and event["invalidated_observed"] == 0
    assert_same_models(group_state(run), group_state(plain))
    # The oracle reference, trained from scratch without the id, reproduces the run bit for bit.
    run, results = _run(_cfg(deletions=schedule), tmp_path, sample, "reference")
    (event,) = [p["cost"] for p in results["phases"] if "cost" in p]
    assert event["oracle"]["reference_from_scratch"]
    reference = checkpoint_tree(run)["reference"]["group"]["state"]
    assert_same_models(reference, group_state(plain))
    assert results["test"]["oracle"] == results["test"]["ensemble"]


@pytest.mark.parametrize("strategy", ["replace", "rewind"])
def test_retraining_is_reproducible(tmp_path, sample, strategy):
    schedule = {"1": [3], "3": list(range(200, 220))}
    cfg = _cfg(strategy=strategy, deletions=_schedule(tmp_path, schedule), fraction=0.5,
               oracle_reference="none")
    first, r1 = _run(cfg, tmp_path, sample, "first")
    second, r2 = _run(cfg, tmp_path, sample, "second")
    assert r1["cost"]["member_epochs"] > 0
    assert_same_models(group_state(first), group_state(second))
    assert r1["final"]["ensemble"] == r2["final"]["ensemble"]
    assert r1["final"]["members"] == r2["final"]["members"]


def _expected_invalidated(members, fraction, chunk, schedule, ids, upto) -> float:
    """Bootstrap: in phase t each member drew int(fraction * n_t) of the n_t examples live then
    (chunks 1..t minus the ids deleted after earlier phases) with replacement; it avoided
    ``ids`` with probability prod_t (1 - h_t / n_t) ** s_t."""
    avoid = 1.0
    for t in range(1, upto + 1):
        n = chunk * t - sum(len(schedule.get(str(p), [])) for p in range(1, t))
        hits = len([i for i in ids if i < chunk * t])
        avoid *= (1 - hits / n) ** int(fraction * n)
    return members * (1 - avoid)


def test_costs_add_up(tmp_path, sample):
    schedule = {"1": [3, 40], "2": [150, 7], "3": [250]}
    cfg = _cfg(strategy="rewind", deletions=_schedule(tmp_path, schedule), fraction=0.5,
               epochs=2)
    _, results = _run(cfg, tmp_path, sample)
    events = [p["cost"] for p in results["phases"] if "cost" in p]
    total = results["cost"]
    assert len(events) == total["events"] == 3
    for key in ("member_epochs", "member_examples", "ids", "invalidated_observed"):
        assert total[key] == sum(e[key] for e in events)
    for e, phase in zip(events, (1, 2, 3)):
        ids = schedule[str(phase)]
        # rewind: each invalid member replays the stages after its rewind point.
        assert e["member_epochs"] == sum((phase - p) * cfg.epochs for p in e["rewound_to"].values())
        assert e["oracle"]["member_epochs"] == cfg.members * phase * cfg.epochs
        assert e["invalidated_observed"] == len(e["rewound_to"])
        assert e["invalidated_expected"] == pytest.approx(_expected_invalidated(
            cfg.members, cfg.fraction, 100, schedule, ids, phase))
        if e["member_examples"]:
            assert e["speedup_vs_oracle"] == e["oracle"]["member_examples"] / e["member_examples"]
    assert total["training"]["member_epochs"] == cfg.members * cfg.phases * cfg.epochs
    assert total["speedup_vs_oracle"] == (total["oracle"]["member_examples"]
                                          / total["member_examples"])


def test_shards_with_slices_rewind_and_vote(tmp_path, sample):
    schedule = {"1": [3, 40], "2": [150]}
    settings = dict(plan="shards", fraction=1.0, slices=2, aggregation="vote",
                    deletions=_schedule(tmp_path, schedule))
    run, results = _run(_cfg(strategy="rewind", **settings), tmp_path, sample)
    seen = np.load(run / "lineage.npz")["lineage"]
    assert (seen.sum(axis=0) <= 1).all()  # shards are disjoint: each id in at most one member
    assert seen.any(axis=1).all()
    for p in results["phases"]:
        if "cost" in p:  # with disjoint shards the expected count is exact
            assert p["cost"]["invalidated_expected"] == p["cost"]["invalidated_observed"]
    stages = checkpoint_tree(run)["strategies"]["ensemble"]["stages"]
    assert len(stages) == results["lineage_audit"]["snapshots"] == 1 + 3 * 2
    assert results["lineage_audit"]["ok"]
    oracle, _ = _run(_cfg(strategy="oracle", **settings), tmp_path, sample, "oracle")
    assert_same_models(group_state(run), group_state(oracle))


def test_fair_baseline_is_unlearned_by_oracle(tmp_path, sample):
    schedule = {"1": [3], "2": [150]}
    cfg = _cfg(baseline="tiny", baseline_plan="full", baseline_unlearning="oracle",
               deletions=_schedule(tmp_path, schedule))
    _, results = _run(cfg, tmp_path, sample)
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
    _, results = _run(cfg, tmp_path, sample)
    before = results["phases"][0]["mia"]["ensemble_before"]
    assert before["n"] == 16
    assert before["threshold"]["auc"] > 0.8 and before["logistic"]["auc"] > 0.8


def test_evaluators_are_chosen_by_the_config(tmp_path, sample):
    cfg = _cfg(evaluators="scores", deletions=_schedule(tmp_path, {"1": [3, 40]}))
    _, results = _run(cfg, tmp_path, sample)
    assert "mia" not in results and "mia" not in results["phases"][0]
    assert results["forget"]["ensemble"]["n"] == 2


def test_strategies_are_registered_with_their_properties():
    assert strategies.NAMES == ("replace", "rewind", "oracle", "finetune", "neggrad",
                                "random_labels", "salun", "scrub")
    exact = {n for n in strategies.NAMES if strategies.make(n).exact}
    assert exact == {"replace", "rewind", "oracle"}
    assert all(strategies.make(n).unlearns for n in strategies.NAMES)
    assert strategies.make("oracle").reference and not strategies.make("rewind").reference
    base = strategies.for_baseline(_cfg(baseline="tiny"))
    assert not base.unlearns and not base.exact  # the original study's reference baseline
    assert strategies.for_baseline(_cfg(baseline="tiny", strategy="oracle")).unlearns


@pytest.mark.parametrize("changes, message", [
    ({"plan": "shards"}, "set fraction=1"),
    ({"slices": 2}, "needs plan=shards"),
    ({"plan": "shards", "fraction": 1.0, "members": 200}, "leaves a member no data"),
    ({"strategy": "retrain"}, "unknown unlearning strategy"),
    ({"strategy": "none"}, "unknown unlearning strategy"),
    ({"oracle_reference": "always"}, "unknown oracle_reference"),
    ({"baseline_plan": "half"}, "unknown baseline_plan"),
    ({"mia_folds": 1}, "mia_folds must be at least 2"),
    ({"evaluators": "scores,ulira"}, "unknown evaluator"),
])
def test_bad_strategy_settings_fail_before_writing(tmp_path, sample, changes, message):
    with pytest.raises(ConfigError, match=message):
        driver.train_and_evaluate(_cfg(**changes), tmp_path / "run", dataset=sample)
    assert not (tmp_path / "run").exists()
