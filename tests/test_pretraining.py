"""A pretrained initialisation on examples declared never deletable (``pretrain=N``): members
start from it and go back to it when unlearned, exactness holds (rewind equals the oracle bit
for bit), and no path deletes one of the N."""

import json

import jax
import numpy as np
import pytest

from conftest import assert_same_models, checkpoint_tree, group_state, results_of, rows
from jaxunlearn import auditing, deletion_log, driver, forgetting
from jaxunlearn.config import ConfigError, apply_overrides, get_preset
from jaxunlearn.deletions import ScheduleError
from jaxunlearn.group import ModelGroup

PRETRAIN = 100  # of the smoke preset's 300 examples: ids 200..299 are never deletable


def _cfg(tmp_path, schedule=None, **changes):
    settings = {"pretrain": PRETRAIN, "pretrain_epochs": 2, "eval_every_epoch": False,
                "baseline": "none", "plan": "shards", "fraction": 1.0, "slices": 2,
                "strategy": "rewind", "oracle_reference": "none", "keep_checkpoints": 10,
                **changes}
    if schedule is not None:
        path = tmp_path / f"schedule-{abs(hash(json.dumps(schedule)))}.json"
        path.write_text(json.dumps(schedule))
        settings["deletions"] = str(path)
    return apply_overrides(get_preset("smoke"), settings)


def _run(cfg, out, sample, **kwargs):
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False,
                              **kwargs)
    return results_of(out)


def _every_member_is(state: dict, base: dict) -> None:
    for part in ("params", "batch_stats"):
        stacked = jax.tree.map(lambda b, s: np.broadcast_to(b, s.shape), base[part], state[part])
        jax.tree.map(np.testing.assert_array_equal, state[part], stacked)


SCHEDULE = {"1": [3, 40], "2": [120, 7]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample):
    """One schedule unlearned by rewind and by the oracle, from the same pretrained start."""
    tmp = tmp_path_factory.mktemp("pretrained")
    out = {}
    for strategy in ("rewind", "oracle"):
        out[strategy] = tmp / strategy
        _run(_cfg(tmp, SCHEDULE, strategy=strategy), out[strategy], sample)
    return out


def test_members_start_from_the_pretrained_model(runs):
    results = results_of(runs["rewind"])
    pre = results["pretrain"]
    assert pre["ids"] == [300 - PRETRAIN, 299] and pre["examples"] == PRETRAIN
    assert pre["member_examples"] == 2 * PRETRAIN  # two epochs over the declared examples
    base = checkpoint_tree(runs["rewind"], step=0)["groups"]["ensemble"]["base"]
    _every_member_is(group_state(runs["rewind"], step=0), base)
    # No stage drew a never-deletable example.
    recorded = checkpoint_tree(runs["rewind"])["stages"]["recorded"]["ensemble"]
    from jaxunlearn.stages import unpack_ragged

    drawn = np.concatenate([np.concatenate(unpack_ragged(s["samples"]))
                            for s in recorded.values()])
    assert drawn.size and drawn.max() < 300 - PRETRAIN


def test_rewind_equals_the_oracle_from_the_pretrained_start(runs):
    results = results_of(runs["rewind"])
    assert results["cost"]["member_epochs"] > 0  # members were rewound and retrained
    assert_same_models(group_state(runs["rewind"]), group_state(runs["oracle"]))
    for run in runs.values():
        ok, problems, _ = auditing.audit(run)
        assert ok, problems


def test_a_run_resumed_mid_way_keeps_its_pretrained_start(tmp_path, sample, runs):
    cfg = _cfg(tmp_path, SCHEDULE)
    out = tmp_path / "resumed"
    _run(cfg, out, sample, stop_after_phase=1)
    driver.resume(out, dataset=sample, log=lambda s: None, progress=False)
    assert_same_models(group_state(out), group_state(runs["rewind"]))


def test_unlearned_members_go_back_to_the_pretrained_model(sample):
    cfg = _cfg(None)
    ds = sample.limit(300, 100)
    arrays = (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
    group = ModelGroup("g", "ensemble", cfg.model, 3, cfg, jax.random.PRNGKey(1), arrays)
    donor = ModelGroup("d", "ensemble", cfg.model, 1, cfg, jax.random.PRNGKey(2), group.data)
    host = donor.host_state()
    base = {"params": jax.tree.map(lambda x: x[0], host.params),
            "batch_stats": jax.tree.map(lambda x: x[0], host.batch_stats)}
    before = group.host_state()
    group.set_base(base)
    group.set_state(before)  # as trained: members differ from the base
    group.unlearn(jax.random.PRNGKey(3), np.array([False, True, False]))
    after = jax.tree.map(np.asarray, group.host_state())
    _every_member_is(rows(after._asdict(), [1]), base)
    kept = np.array([True, False, True])
    for part in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, rows(getattr(after, part), kept),
                     rows(getattr(before, part), kept))


def test_forget_refuses_a_pretraining_id_and_changes_nothing(runs):
    run = runs["rewind"]
    before = (run / "results.json").read_bytes()
    with pytest.raises(forgetting.RequestError, match="pretraining set"):
        forgetting.forget(run, [250], log=lambda s: None)
    assert (run / "results.json").read_bytes() == before
    with deletion_log.DeletionLog.open(run, create=False) as log:
        assert not any(250 in r["ids"] for r in log.records())


def test_a_schedule_deleting_a_pretraining_id_fails_before_writing(tmp_path, sample):
    cfg = _cfg(tmp_path, {"1": [250]})
    with pytest.raises(ScheduleError, match="cannot be deleted"):
        _run(cfg, tmp_path / "bad", sample)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("changes, message", [
    ({"pretrain": 300}, "pretrain"),
    ({"pretrain": -1}, "pretrain"),
    ({"pretrain_epochs": 0}, "pretrain_epochs"),
    ({"pretrain_lr": -0.1}, "pretrain_lr"),
    ({"pretrain": 298}, "cannot fill"),  # 2 deletable examples for 3 phases
])
def test_bad_pretraining_settings_fail_before_writing(tmp_path, sample, changes, message):
    with pytest.raises(ConfigError, match=message):
        _run(_cfg(tmp_path, **changes), tmp_path / "bad", sample)
    assert not (tmp_path / "bad").exists()


def test_the_audit_flags_a_deleted_pretraining_id():
    from jaxunlearn.auditing import _pretraining

    cfg = _cfg(None)
    tree = {"report": {"results": {"n_train": 300}}}
    assert _pretraining(cfg, tree, np.array([3, 7])) == []
    problems = _pretraining(cfg, tree, np.array([3, 250]))
    assert len(problems) == 1 and "[250]" in problems[0]


def test_a_run_killed_during_its_pretraining_starts_again_when_resumed(tmp_path, sample,
                                                                       monkeypatch, runs):
    from jaxunlearn import pretraining

    out = tmp_path / "killed"
    real = pretraining.pretrain

    def killed(run):
        raise KeyboardInterrupt  # stopped before checkpoint 0 was written

    monkeypatch.setattr(pretraining, "pretrain", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(_cfg(tmp_path, SCHEDULE), out, sample)
    assert (out / "config.json").exists() and not (out / "results.json").exists()
    monkeypatch.setattr(pretraining, "pretrain", real)
    messages = []
    driver.resume(out, dataset=sample, log=messages.append, progress=False)
    assert any("starting it again" in m for m in messages)
    assert_same_models(group_state(out), group_state(runs["rewind"]))
    assert auditing.audit(out)[0]
