"""Approximate strategies, the LiRA evaluator, shadow members and the comparison table,
through a run's public outputs (results.json, checkpoints, the audit, `jaxunlearn report`)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import checkpoint_tree, group_state, results_of, rows
from jaxunlearn import auditing, cli, driver, comparison, steps
from jaxunlearn.strategies import scrub
from jaxunlearn.config import ConfigError, apply_overrides, get_preset
from jaxunlearn.validation import check
from jaxunlearn.models import make_model
from jaxunlearn.driver import fork as run_fork

APPROXIMATE = ["finetune", "neggrad", "random_labels", "salun", "scrub"]


def _cfg(**changes):
    return apply_overrides(get_preset("smoke"), {"eval_every_epoch": False, "baseline": "none",
                                                 **changes})


def _run(cfg, tmp_path, sample, name, **kwargs):
    out = tmp_path / name
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False,
                              **kwargs)
    return out, results_of(out)


def _schedule(tmp_path, schedule):
    path = tmp_path / "deletions.json"
    path.write_text(json.dumps(schedule))
    return str(path)


@pytest.fixture(scope="module")
def before(tmp_path_factory, sample):
    """Phase 1 of the smoke run with nothing deleted: what unlearning starts from."""
    tmp = tmp_path_factory.mktemp("before")
    run, _ = _run(_cfg(deletion_rate=0.0), tmp, sample, "before", stop_after_phase=1)
    return run


@pytest.mark.parametrize("strategy", APPROXIMATE)
def test_approximate_strategies_change_only_the_invalid_members(tmp_path, sample, before,
                                                                strategy):
    seen = checkpoint_tree(before)["groups"]["ensemble"]["lineage"]["seen"]
    ids = np.flatnonzero(seen[0])[:3]  # held by member 0 (and maybe others)
    invalid = seen[:, ids].any(axis=1)
    assert 0 < invalid.sum() < len(invalid)
    cfg = _cfg(strategy=strategy, deletions=_schedule(tmp_path, {"1": ids.tolist()}),
               keep_checkpoints=5)
    run, results = _run(cfg, tmp_path, sample, strategy, stop_after_phase=1)
    phase = results["phases"][0]
    assert phase["invalidated"] == np.flatnonzero(invalid).tolist()
    assert phase["cost"]["strategy"] == strategy and phase["cost"]["member_examples"] > 0
    old, new = group_state(before), group_state(run)
    for part in ("params", "batch_stats"):  # the valid members: bit-identical
        jax.tree.map(np.testing.assert_array_equal, rows(new[part], ~invalid),
                     rows(old[part], ~invalid))
    for i in np.flatnonzero(invalid):  # each invalid member: trained further
        changed = jax.tree.leaves(jax.tree.map(
            lambda a, b: bool(np.any(np.asarray(a)[i] != np.asarray(b)[i])),
            new["params"], old["params"]))
        assert any(changed)
    # By design its lineage still holds the forgotten ids; the audit says so and passes, and no
    # checkpoint but the newest (the live state) is kept holding them.
    lineage = checkpoint_tree(run)["groups"]["ensemble"]["lineage"]["seen"]
    assert lineage[:, ids].any()
    ok, lines, summary = auditing.audit(run)
    assert ok, lines
    assert any(f"strategy {strategy} unlearns approximately" in line for line in lines)


def test_an_approximate_run_reports_itself_approximate_and_purges(tmp_path, sample):
    cfg = _cfg(strategy="neggrad", deletion_rate=0.02, keep_checkpoints=10)
    run, results = _run(cfg, tmp_path, sample, "run")
    audit_block = results["lineage_audit"]
    assert audit_block["ok"] and not audit_block["exact"]
    assert audit_block["held_by_design"] > 0 and audit_block["violations"] == 0
    # every kept checkpoint but the newest is clean of deleted ids (the purge ran)
    from jaxunlearn import checkpoint
    ckpts = checkpoint.Checkpoints(run, read_only=True)
    try:
        kept = ckpts.steps()
        deleted = np.asarray(results["deleted_ids"])
        for step in kept[:-1]:
            lineages, meta = ckpts.load_lineages(step)
            for entry in meta["lineages"]:
                assert not np.asarray(lineages[entry["where"]])[:, deleted].any()
    finally:
        ckpts.close()


def test_negative_weight_ascends_the_loss():
    model = make_model("tiny", "imagenet")
    tx = optax.sgd(0.1)
    state = steps.init_member(model, tx, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 8))
    idx = jnp.arange(8, dtype=jnp.int32)

    def loss(s):
        logits = steps.eval_logits(model, s, images, idx)
        return float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))

    up, _ = steps.train_step(model, tx, False, state, images, labels, idx,
                             -jnp.ones(8), jnp.asarray(True))
    down, _ = steps.train_step(model, tx, False, state, images, labels, idx,
                               jnp.ones(8), jnp.asarray(True))
    assert loss(up) > loss(state) > loss(down)


def _changed_share(new, old, i) -> float:
    """The share of member ``i``'s parameter entries that differ between two states."""
    assert jax.tree.structure(new) == jax.tree.structure(old)
    diff = [np.asarray(a)[i] != np.asarray(b)[i] for a, b in zip(jax.tree.leaves(new),
                                                                   jax.tree.leaves(old))]
    return sum(int(d.sum()) for d in diff) / sum(d.size for d in diff)


def test_salun_changes_only_the_weights_salient_for_the_forget_set(tmp_path, sample, before):
    seen = checkpoint_tree(before)["groups"]["ensemble"]["lineage"]["seen"]
    ids = np.flatnonzero(seen[0])[:3]
    invalid = seen[:, ids].any(axis=1)
    schedule = _schedule(tmp_path, {"1": ids.tolist()})
    shares = {}
    for strategy in ("salun", "random_labels"):
        cfg = _cfg(strategy=strategy, deletions=schedule, salun_sparsity=0.9)
        run, _ = _run(cfg, tmp_path, sample, strategy, stop_after_phase=1)
        old, new = group_state(before), group_state(run)
        assert jax.tree.structure(new["params"]) == jax.tree.structure(old["params"])
        shares[strategy] = [_changed_share(new["params"], old["params"], i)
                            for i in np.flatnonzero(invalid)]
    # The top 10% of weights by |forget gradient| may move (a few more where |g| ties at the
    # threshold); random labels without the mask move nearly all of them.
    assert all(0 < share <= 0.11 for share in shares["salun"]), shares
    assert all(share > 0.9 for share in shares["random_labels"]), shares


def test_a_fork_unlearns_one_trained_run_another_way(tmp_path, sample):
    from jaxunlearn import forgetting

    base, _ = _run(_cfg(deletion_rate=0.0, strategy="rewind"), tmp_path, sample, "base")
    fork = tmp_path / "finetune"
    assert cli.main(["fork", str(base), str(fork), "strategy=finetune", "unlearn_lr=0.05"]) == 0
    forked = results_of(fork)
    assert forked["complete"] and forked["config"]["strategy"] == "finetune"
    assert forked["config"]["unlearn_lr"] == 0.05
    for part in ("params", "batch_stats"):  # the same trained bits
        jax.tree.map(np.testing.assert_array_equal, group_state(fork)[part],
                     group_state(base)[part])
    seen = checkpoint_tree(base)["groups"]["ensemble"]["lineage"]["seen"]
    ids = np.flatnonzero(seen[0])[:2].tolist()
    outcome = forgetting.forget(fork, ids, log=lambda s: None, dataset=sample)
    assert outcome["status"] == "applied"
    assert outcome["results"]["requests"][-1]["cost"]["strategy"] == "finetune"
    assert not outcome["results"]["lineage_audit"]["exact"]
    assert results_of(base)["config"]["strategy"] == "rewind"  # the original is untouched
    assert not results_of(base).get("deleted_ids")
    # A run that deleted something cannot change how it unlearns; a fork cannot retrain.
    with pytest.raises(ConfigError, match="before its first deletion"):
        run_fork(fork, tmp_path / "again", ["strategy=neggrad"])
    with pytest.raises(ConfigError, match="epochs"):
        run_fork(base, tmp_path / "longer", ["epochs=3"])
    with pytest.raises(ConfigError, match="not empty"):
        run_fork(base, fork, ["strategy=oracle"])
    assert not (tmp_path / "again").exists() and not (tmp_path / "longer").exists()


def test_distillation_pulls_a_student_to_its_teacher_or_pushes_it_away():
    model = make_model("tiny", "imagenet")
    tx = optax.sgd(0.5)
    student = steps.init_member(model, tx, jax.random.PRNGKey(0))
    teacher_state = steps.init_member(model, tx, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, 10, 16))
    idx = jnp.arange(16, dtype=jnp.int32)
    teacher = steps.eval_logits(model, teacher_state, images, idx)

    def kl(s):
        logits = steps.eval_logits(model, s, images, idx)
        return float(jnp.mean(steps.distill_kl(logits, teacher, scrub.T)))

    # distill_kl is KL(teacher || student) at temperature T, times T^2
    t, z = teacher / scrub.T, steps.eval_logits(model, student, images, idx) / scrub.T
    p, q = jax.nn.softmax(t), jax.nn.softmax(z)
    manual = jnp.sum(p * (jnp.log(p) - jnp.log(q)), axis=-1) * scrub.T ** 2
    np.testing.assert_allclose(steps.distill_kl(z * scrub.T, teacher, scrub.T),
                               manual, rtol=1e-4, atol=1e-6)
    # A max pass (negative weights: the KL alone, ascended) moves away from the teacher; with
    # the cross-entropy's weight at 0.99 and the KL's at 0.001 a min pass is mostly learning
    # the labels, so the pull is checked with the KL term alone.
    away, _ = steps.train_step(model, tx, False, student, images, labels, idx, -jnp.ones(16),
                               jnp.asarray(True), hook=scrub.HOOK, aux=teacher)
    assert kl(away) > kl(student)
    assert scrub.GAMMA == 0.99 and scrub.ALPHA == 0.001 and scrub.T == 4.0


@pytest.mark.parametrize("change, words", [
    ({"unlearn_epochs": 0}, "unlearn_epochs"),
    ({"unlearn_lr": 0.0}, "unlearn_lr"),
    ({"unlearn_lr": -0.1}, "unlearn_lr"),
    ({"neggrad_beta": 1.0}, "neggrad_beta"),
    ({"salun_sparsity": 1.0}, "salun_sparsity"),
    ({"strategy": "scrub", "devices": 2}, "one device"),
    ({"shadow_members": 2}, "add lira to evaluators"),
    ({"shadow_members": 2, "evaluators": "lira", "plan": "shards", "fraction": 1.0},
     "plan bootstrap or subset"),
    ({"shadow_members": 2, "evaluators": "lira", "plan": "subset", "fraction": 1.0},
     "did not train on"),
])
def test_settings_that_cannot_work_are_refused(change, words):
    with pytest.raises(ConfigError, match=words):
        check(_cfg(**change), 300)


def test_lira_after_exact_unlearning_matches_the_oracle_and_shadows_never_predict(tmp_path,
                                                                                   sample):
    cfg = _cfg(strategy="rewind", deletion_rate=0.05, evaluators="scores,mia,lira",
               shadow_members=2)
    run, results = _run(cfg, tmp_path, sample, "run")
    members = results["final"]["members"]
    assert [m.get("shadow", False) for m in members] == [False] * 3 + [True] * 2
    assert results["final"]["ensemble"]["members"] == cfg.members  # shadows not aggregated
    lira = results["lira"]
    assert lira["ensemble"]["n"] == len(results["deleted_ids"])
    assert lira["ensemble"]["n_nonmembers"] == results["n_test"]
    # rewind's ensemble is the oracle, bit for bit, so the attack cannot tell them apart
    assert lira["ensemble"]["auc"] == lira["oracle"]["auc"]
    assert lira["ensemble_before_last_deletion"]["n"] == lira["ensemble"]["n"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, sample):
    tmp = tmp_path_factory.mktemp("compared")
    runs = {}
    for strategy, reference in (("rewind", "end"), ("finetune", "none"), ("replace", "none")):
        runs[strategy], _ = _run(_cfg(strategy=strategy, oracle_reference=reference,
                                      deletion_rate=0.03, evaluators="scores,mia,lira"),
                                 tmp, sample, strategy)
    return runs


def test_the_table_gives_rewind_no_gap_and_writes_its_files(tmp_path, compared, capsys):
    rows_ = comparison.table([compared[s] for s in ("rewind", "finetune", "replace")])
    assert [r["method"] for r in rows_] == ["oracle", "rewind", "finetune", "replace"]
    by = {r["method"]: r for r in rows_}
    assert by["rewind"]["avg_gap"] == 0.0 and by["oracle"]["avg_gap"] == 0.0
    assert by["finetune"]["exact"] is False and by["rewind"]["exact"] is True
    assert by["finetune"]["avg_gap"] is not None and by["replace"]["avg_gap"] is not None
    for column in ("forget_acc", "retain_acc", "test_acc", "mia_auc", "lira_auc"):
        assert by["rewind"][column] == by["oracle"][column]
    out = tmp_path / "report"
    assert cli.main(["report", *map(str, compared.values()), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"table.md", "table.csv", "gap_vs_seconds.png"}
    text = (out / "table.md").read_text()
    assert text.count("\n") == 2 + 4 and "| rewind | yes |" in text
    assert "| rewind |" in capsys.readouterr().out


def test_report_refuses_runs_it_cannot_compare(tmp_path, compared, capsys):
    other = tmp_path / "other"
    shutil.copytree(compared["finetune"], other)
    results = results_of(other)
    results["config"]["epochs"] = 7
    (other / "results.json").write_text(json.dumps(results))
    out = tmp_path / "report"
    assert cli.main(["report", str(compared["rewind"]), str(other), "--out", str(out)]) == 2
    assert "epochs=7" in capsys.readouterr().err and not out.exists()
    results["config"].update(epochs=1, preset="demo")
    (other / "results.json").write_text(json.dumps(results))
    with pytest.raises(comparison.ReportError, match="one preset"):
        comparison.table([compared["rewind"], other])
    results["config"]["preset"] = "smoke"
    results["data_fingerprint"] = "0" * 16
    (other / "results.json").write_text(json.dumps(results))
    with pytest.raises(comparison.ReportError, match="one dataset"):
        comparison.table([compared["rewind"], other])
    with pytest.raises(comparison.ReportError, match="no run has an oracle"):
        comparison.table([compared["finetune"]])
    with pytest.raises(comparison.ReportError, match="no results.json"):
        comparison.table([tmp_path])
