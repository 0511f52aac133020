"""Durability: checkpoints, exact resume after SIGKILL, forget/audit/log, faults, bad input."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from conftest import checkpoint_tree, results_of as _results
from jaxunlearn import auditing, checkpoint, cli, data, deletion_log, driver, faults, files
from jaxunlearn import forgetting, runlock
from jaxunlearn.config import ConfigError, apply_overrides, get_preset
from jaxunlearn.trainer import TrainingDiverged

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The killed runs and the in-process references share this configuration.
KILL_SETTINGS = ["checkpoint_every=3", "strategy=rewind", "keep_checkpoints=3"]


def _cfg(**changes):
    return apply_overrides(get_preset("smoke"), {"eval_every_epoch": False, **changes})


def _strip(obj):
    """Results without wall-clock timings (which differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items()
                if "seconds" not in k and k not in ("elapsed",)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _assert_same_final_state(a, b):
    """The newest checkpoints' groups (states and lineages) and strategy states are equal."""
    ta, tb = checkpoint_tree(a), checkpoint_tree(b)
    for part in ("groups", "strategies"):
        chex.assert_trees_all_equal(ta[part], tb[part])


def _lineage(run_dir, step=None):
    return checkpoint_tree(run_dir, step)["groups"]["ensemble"]["lineage"]["seen"]


def _tree_digest(folder) -> dict:
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _cli_run(out, *settings, faults_spec=""):
    """`jaxunlearn run --preset smoke` in a fresh process (SIGKILLed at ``faults_spec``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(faults.ENV_VAR, None)
    if faults_spec:
        env[faults.ENV_VAR] = faults_spec
    proc = subprocess.run([sys.executable, "-m", "jaxunlearn.cli", "run", "--preset", "smoke",
                           "--out", str(out), "--quiet", *settings], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample):
    """The uninterrupted run every killed-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = apply_overrides(get_preset("smoke"), KILL_SETTINGS)
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False)
    return out


@pytest.mark.parametrize("fault", [
    "phase.step@8",  # mid-phase 1, after a mid-phase checkpoint (every 3 steps)
    "checkpoint.before_manifest@4",  # mid-checkpoint: orbax wrote it, its manifest never came
    "checkpoint.before_purge@2",  # a deletion checkpointed, its purge and log outcome not yet
    "snapshot.before_digest@2",  # a rewind snapshot written to disk, not yet complete
])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, sample, reference, fault):
    proc = _cli_run(tmp_path, *KILL_SETTINGS, faults_spec=fault)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed by SIGKILL
    (run_dir,) = tmp_path.iterdir()
    assert not _results(run_dir)["complete"]
    messages = []
    driver.resume(run_dir, dataset=sample, log=messages.append, progress=False)
    assert any("resuming" in m for m in messages)
    if "manifest" in fault:
        assert any("discarded incomplete checkpoint" in m for m in messages)
    if "snapshot" in fault:  # the unfinished snapshot is gone, replaced by a complete one
        snapshots = run_dir / "snapshots"
        assert sorted(p.name for p in snapshots.glob("*.sha256")) == sorted(
            f"{p.name}.sha256" for p in snapshots.iterdir() if p.is_dir())
    got, want = _results(run_dir), _results(reference)
    assert got["complete"]
    for key in ("final", "forget", "retain", "test", "mia", "cost", "deleted_ids",
                "lineage_audit", "phases"):
        assert _strip(got[key]) == _strip(want[key]), key
    _assert_same_final_state(run_dir, reference)
    lines = [_strip(json.loads(l)) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [_strip(json.loads(l)) for l in
                     (reference / "metrics.jsonl").read_text().splitlines()]
    ok, problems, summary = auditing.audit(run_dir)
    assert ok, problems
    records = deletion_log.DeletionLog.open(run_dir, create=False).records()
    assert [r["outcome"] for r in records] == ["applied", "applied"]


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, sample, reference):
    cfg = apply_overrides(get_preset("smoke"), KILL_SETTINGS)
    driver.train_and_evaluate(cfg, tmp_path / "run", dataset=sample, log=lambda s: None,
                              progress=False, stop_after_phase=2)
    ckpts = checkpoint.Checkpoints(tmp_path / "run")
    previous, newest = ckpts.steps()[-2:]
    victim = max((p for p in (ckpts.root / str(newest)).rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    messages = []
    driver.resume(tmp_path / "run", dataset=sample, log=messages.append, progress=False)
    assert any(f"checkpoint {newest} is damaged" in m and "falling back" in m for m in messages)
    (resumed,) = [m for m in messages if m.startswith("resuming")]
    assert f"from checkpoint {previous} " in resumed
    assert _strip(_results(tmp_path / "run")["final"]) == _strip(_results(reference)["final"])
    _assert_same_final_state(tmp_path / "run", reference)


@pytest.fixture(scope="module")
def _trained(tmp_path_factory, sample):
    cfg = _cfg(strategy="rewind", keep_checkpoints=10)
    out = tmp_path_factory.mktemp("trained") / "run"
    driver.train_and_evaluate(cfg, out, dataset=sample, log=lambda s: None, progress=False)
    return out


@pytest.fixture
def finished(tmp_path, _trained):
    """A finished smoke run (rewind, ten checkpoints kept) of the test's own: a copy of one
    trained once per module, as `fork` copies a run (its lock file left out)."""
    out = tmp_path / "run"
    shutil.copytree(_trained, out, ignore=shutil.ignore_patterns(".lock"))
    return out


def test_forget_then_audit_is_clean_and_purges_checkpoints_that_held_the_ids(finished, sample):
    ids = [int(i) for i in np.flatnonzero(_lineage(finished)[0])[:3]]  # member 0 saw them
    before = checkpoint.Checkpoints(finished).steps()
    outcome = forgetting.forget(finished, ids, log=lambda s: None, dataset=sample)
    assert outcome["status"] == "applied"
    assert 0 in outcome["record"]["invalidated"]
    results = _results(finished)
    assert set(ids) <= set(results["deleted_ids"]) and results["lineage_audit"]["ok"]
    assert results["requests"][-1]["ids"] == sorted(ids)
    ok, problems, summary = auditing.audit(finished)
    assert ok, problems
    assert summary.startswith("ok:")
    after = checkpoint.Checkpoints(finished).steps()
    assert len(after) < len(before) + 1  # checkpoints that held the ids were purged
    for step in after:
        lineages, _ = checkpoint.Checkpoints(finished).load_lineages(step)
        ensemble = {w: seen for w, seen in lineages.items() if w != "baseline"}  # a reference
        assert "live ensemble" in ensemble and "rewind snapshot of stage 0" in ensemble
        assert not any(seen[:, ids].any() for seen in ensemble.values())
    (record,) = [r for r in deletion_log.DeletionLog.open(finished).records()
                 if r["source"].startswith("forget")]
    assert record["outcome"] == "applied" and record["checkpoints_purged"]
    assert record["ids"] == ids and 0 in record["members_invalidated"]


def test_audit_fails_on_a_kept_checkpoint_that_holds_a_deleted_id(finished, sample, capsys):
    ckpts = checkpoint.Checkpoints(finished)
    ids = [int(np.flatnonzero(_lineage(finished)[1])[0])]
    # Keep a copy of every checkpoint, forget, then put the purged ones back.
    saved = finished.parent / "saved"
    shutil.copytree(ckpts.root, saved)
    forgetting.forget(finished, ids, log=lambda s: None, dataset=sample)
    for step_dir in saved.iterdir():
        if step_dir.name.isdigit() and not (ckpts.root / step_dir.name).exists():
            shutil.copytree(step_dir, ckpts.root / step_dir.name)
            shutil.copy(saved / "manifests" / f"{step_dir.name}.json", ckpts.manifests)
    assert cli.main(["audit", str(finished)]) == 1
    out = capsys.readouterr().out
    assert "still depends on deleted id(s)" in out and f"{ids[0]}" in out
    assert "FAILED" in out


def test_concurrent_forget_calls_leave_a_consistent_log(finished):
    free = [int(i) for i in np.flatnonzero(_lineage(finished).any(axis=0))]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "jaxunlearn.cli", "forget", str(finished),
                               "--ids", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in free[:2]]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    records = deletion_log.DeletionLog.open(finished).records()
    forgets = [r for r in records if r["source"].startswith("forget")]
    assert sorted(r["ids"][0] for r in forgets) == sorted(free[:2])
    assert all(r["outcome"] == "applied" for r in forgets)
    assert len({r["id"] for r in records}) == len(records)
    assert set(free[:2]) <= set(_results(finished)["deleted_ids"])
    assert auditing.audit(finished)[0]


@pytest.mark.parametrize("ids, message", [
    ("99999", "do not exist"),
    ("-1", "do not exist"),
    ("4,4", "more than once"),
    ("1,two", "not integers"),
    ("", "names no ids"),
    ("ALREADY", "already deleted"),
])
def test_bad_requests_change_nothing_on_disk(finished, capsys, ids, message):
    if ids == "ALREADY":
        ids = str(_results(finished)["deleted_ids"][0])
    before = _tree_digest(finished)
    assert cli.main(["forget", str(finished), "--ids", ids]) == 2
    assert message in capsys.readouterr().err
    assert _tree_digest(finished) == before


def test_a_second_process_cannot_open_a_locked_run(finished, sample):
    free = np.flatnonzero(~np.isin(np.arange(300), _results(finished)["deleted_ids"]))
    with runlock.run_lock(finished, purpose="run") as held:
        with pytest.raises(runlock.RunLocked, match="in use by another process"):
            driver.resume(finished, dataset=sample, log=lambda s: None)
        # A forget on a run in progress (it takes requests) is recorded and taken by it.
        held.update(takes_requests=True)
        outcome = forgetting.forget(finished, [int(free[0])], log=lambda s: None, dataset=sample)
        assert outcome["status"] == "taken" and "applies request" in outcome["message"]
        # One that no longer takes them is waited for; still busy, the request is queued.
        held.update(takes_requests=False)
        outcome = forgetting.forget(finished, [int(free[1])], log=lambda s: None, dataset=sample,
                                  wait=0.2)
        assert outcome["status"] == "queued" and "next open" in outcome["message"]
    assert not auditing.audit(finished)[0]  # pending: not applied yet
    driver.resume(finished, dataset=sample, log=lambda s: None, progress=False)
    assert set(free[:2]) <= set(_results(finished)["deleted_ids"])  # a finished run applies
    # the requests queued
    assert auditing.audit(finished)[0]


def test_resume_refuses_a_changed_config_and_says_which_fields(finished, sample):
    before = _tree_digest(finished)
    with pytest.raises(ConfigError, match=r"epochs: 1 -> 2.*--allow-config-change"):
        driver.resume(finished, ["epochs=2"], dataset=sample)
    with pytest.raises(ConfigError, match="cannot resume .* different members"):
        driver.resume(finished, ["members=5"], allow_config_change=True, dataset=sample)
    with pytest.raises(data.DataError):  # the data is missing
        driver.resume(finished, ["data=/nonexistent/cifar"], allow_config_change=True)
    other = data.load_sample().limit(200, 100)
    with pytest.raises(data.DataError, match="not the data"):
        driver.resume(finished, dataset=other)
    assert _tree_digest(finished) == before
    # A setting that may change is taken, saved, and used from then on.
    assert _results(finished)["mia"]["ensemble"]["folds"] == 3  # 3 forget ids, 5 folds asked
    results = driver.resume(finished, ["mia_folds=2"], allow_config_change=True,
                            dataset=sample, log=lambda s: None)
    assert results["config"]["mia_folds"] == 2 and results["mia"]["ensemble"]["folds"] == 2
    assert json.loads((finished / "config.json").read_text())["mia_folds"] == 2


def test_nan_loss_stops_the_phase_and_keeps_the_last_good_checkpoint(tmp_path, sample):
    cfg = _cfg(learning_rate=1e38, optimizer="sgd", phases=2, checkpoint_every=2)
    with pytest.raises(TrainingDiverged) as caught:
        driver.train_and_evaluate(cfg, tmp_path / "run", dataset=sample, log=lambda s: None)
    e = caught.value
    assert e.members and e.step >= 1 and "--resume" in str(e)
    results = _results(tmp_path / "run")
    assert not results["complete"]
    assert results["error"]["kind"] == "diverged" and results["error"]["members"] == e.members
    ckpts = checkpoint.Checkpoints(tmp_path / "run")
    step, tree, _ = ckpts.load_latest(lambda s: None)
    floats = [leaf for leaf in jax.tree.leaves(tree["groups"])
              if np.issubdtype(np.asarray(leaf).dtype, np.floating)]
    assert len(floats) > 10 and all(np.isfinite(leaf).all() for leaf in floats)


def test_a_disk_error_while_writing_keeps_the_previous_checkpoint(tmp_path, sample, monkeypatch):
    import orbax.checkpoint as ocp

    run = tmp_path / "run"
    driver.train_and_evaluate(_cfg(), run, dataset=sample, log=lambda s: None, progress=False,
                              stop_after_phase=1)
    good = checkpoint.Checkpoints(run).steps()[-1]

    def full_disk(manager, step, *args, **kwargs):
        (run / "checkpoints" / str(step)).mkdir()  # a partial write
        (run / "checkpoints" / str(step) / "junk").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(ocp.CheckpointManager, "save", full_disk)
        with pytest.raises(checkpoint.CheckpointError, match="No space left.*intact"):
            driver.resume(run, dataset=sample, log=lambda s: None, progress=False)
    step, _, _ = checkpoint.Checkpoints(run).load_latest(lambda s: None)
    assert step == good
    assert driver.resume(run, dataset=sample, log=lambda s: None, progress=False)["complete"]


def test_log_command_prints_every_request(finished, capsys):
    deleted = [p["deleted_ids"] for p in _results(finished)["phases"] if p["deleted_ids"]]
    assert cli.main(["log", str(finished)]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == len(deleted) == 2
    for phase, (row, ids) in enumerate(zip(rows, deleted), start=1):
        assert f"schedule (after phase {phase})" in row and "applied" in row and "rewind" in row
        assert ", ".join(map(str, ids)) in row
    assert cli.main(["log", str(finished.parent / "missing")]) == 2


def test_falling_back_past_an_applied_forget_deletes_its_ids_again(finished, sample):
    ids = [int(i) for i in np.flatnonzero(~_lineage(finished).any(axis=0))[:2]]  # no member has
    assert forgetting.forget(finished, ids, log=lambda s: None, dataset=sample)["status"] == "applied"
    ckpts = checkpoint.Checkpoints(finished)
    after = [step for step in ckpts.steps()  # the checkpoints that record the deletion
             if set(ids) <= set(ckpts.load_meta(step)["tree"]["deletions"]["ids"])]
    assert after and len(after) < len(ckpts.steps())
    for step in after:
        victim = next(p for p in (ckpts.root / str(step)).rglob("*") if p.is_file()
                      and p.stat().st_size > 100)
        victim.write_bytes(b"\0" * victim.stat().st_size)  # corrupted, same size
    messages = []
    driver.resume(finished, dataset=sample, log=messages.append, progress=False)
    assert any("does not match its checksum" in m for m in messages)
    assert any("deleting them again" in m for m in messages)
    assert set(ids) <= set(_results(finished)["deleted_ids"])
    (again,) = [r for r in _results(finished)["requests"] if r["source"].startswith("re-applied")]
    assert again["ids"] == sorted(ids) and again["request"] is None
    assert auditing.audit(finished)[0]


def test_sigkill_inside_a_slice_of_the_shards_plan_resumes_exactly(tmp_path, sample):
    settings = ["plan=shards", "fraction=1", "slices=2", "strategy=rewind", "checkpoint_every=2",
                "keep_checkpoints=3"]
    reference = tmp_path / "reference"
    driver.train_and_evaluate(apply_overrides(get_preset("smoke"), settings), reference,
                              dataset=sample, log=lambda s: None, progress=False)
    killed = tmp_path / "killed"
    proc = _cli_run(killed, *settings, faults_spec="phase.step@9")
    assert proc.returncode == -9, proc.stderr[-2000:]
    (run_dir,) = killed.iterdir()
    messages = []
    driver.resume(run_dir, dataset=sample, log=messages.append, progress=False)
    assert any(m.startswith("resuming") and "inside phase" in m for m in messages)
    got, want = _results(run_dir), _results(reference)
    for key in ("final", "forget", "retain", "test", "mia", "cost", "phases", "lineage_audit"):
        assert _strip(got[key]) == _strip(want[key]), key
    _assert_same_final_state(run_dir, reference)


def _format_1_checkpoint(run_dir) -> None:
    """Replaces a run's checkpoints by one as jaxunlearn 0.1 wrote them: items state, lineage,
    plan and meta (format 1), with its manifest."""
    import orbax.checkpoint as ocp

    shutil.rmtree(run_dir / "checkpoints")
    root = (run_dir / "checkpoints").resolve()
    (root / "manifests").mkdir(parents=True)
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False), item_names=("state", "lineage", "plan", "meta"))
    arrays = {"ensemble": {"00000": np.ones((3, 4), np.float32)}}
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays), lineage=ocp.args.StandardSave(
            {"ensemble": {"seen": np.zeros((3, 300), bool)}}),
        plan=ocp.args.StandardSave({"empty": np.array([-1])}),
        meta=ocp.args.JsonSave({"format": 1, "phase_done": 3, "deleted": [],
                                "results": {"n_train": 300}})))
    manager.wait_until_finished()
    manager.close()
    files.atomic_write(root / "manifests" / "0.json",
                       json.dumps({"step": 0, "files": checkpoint._files(root / "0")}))


def test_a_run_folder_of_an_older_format_gets_a_clear_message(finished, sample, capsys):
    _format_1_checkpoint(finished)
    before = _tree_digest(finished)
    with pytest.raises(checkpoint.CheckpointFormatError, match="format 1.*reads format 2"):
        driver.resume(finished, dataset=sample, log=lambda s: None)
    for command in (["audit", str(finished)], ["forget", str(finished), "--ids", "5"],
                    ["run", "--resume", str(finished)]):
        assert cli.main(command) == 2
        assert "format 1" in capsys.readouterr().err
    assert _tree_digest(finished) == before


def _metrics(run_dir) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _reference_lineage(run_dir):
    group = checkpoint_tree(run_dir)["reference"]["group"]
    return group["lineage"]["seen"] if group else None


def test_a_forget_that_no_model_saw_retrains_nothing(finished, sample):
    seen = _lineage(finished).any(axis=0) | _reference_lineage(finished).any(axis=0)
    ids = [int(i) for i in np.flatnonzero(~seen)[:2]]
    lines = len(_metrics(finished))
    outcome = forgetting.forget(finished, ids, log=lambda s: None, dataset=sample)
    assert outcome["record"]["invalidated"] == [] and outcome["record"]["cost"]["member_epochs"] == 0
    trained = [l for l in _metrics(finished)[lines:] if "train_loss" in l]
    assert trained == []  # no member of the ensemble or of the oracle reference trained
    results = _results(finished)  # the reference, still exact, is still compared
    assert results["test"]["oracle"] == results["test"]["ensemble"]
    assert auditing.audit(finished)[0]


def test_a_forget_drops_an_oracle_reference_it_does_not_update(finished, sample):
    reference = _reference_lineage(finished)
    ids = [int(np.flatnonzero(reference[0])[0])]  # the reference trained on it
    lines = len(_metrics(finished))
    forgetting.forget(finished, ids, log=lambda s: None, dataset=sample)  # oracle_reference=end
    assert not any(l.get("model") == "oracle" for l in _metrics(finished)[lines:])
    assert _reference_lineage(finished) is None  # nothing kept depends on the id
    results = _results(finished)
    assert "oracle" not in results["test"] and set(ids) <= set(results["deleted_ids"])
    assert auditing.audit(finished)[0]


def test_oracle_reference_follows_deletions_incrementally(tmp_path, sample):
    cfg = _cfg(strategy="replace", oracle_reference="deletions", keep_checkpoints=10)
    run = tmp_path / "run"
    driver.train_and_evaluate(cfg, run, dataset=sample, log=lambda s: None, progress=False)
    results = _results(run)
    events = [p["cost"]["oracle"] for p in results["phases"] if "cost" in p]
    assert [e["reference_from_scratch"] for e in events] == [True] + [False] * (len(events) - 1)
    reference = _reference_lineage(run)
    ids = [int(np.flatnonzero(reference[1])[0])]
    lines = len(_metrics(run))
    outcome = forgetting.forget(run, ids, log=lambda s: None, dataset=sample)
    oracle = outcome["record"]["cost"]["oracle"]
    assert not oracle["reference_from_scratch"] and oracle["reference_seconds"] > 0  # it retrained
    retrained = [l for l in _metrics(run)[lines:] if l.get("model") == "oracle"]
    hit = reference[:, ids].any(axis=1)
    assert retrained and all([x is not None for x in l["train_loss"]] == hit.tolist()
                             for l in retrained)  # only the reference members that saw it
    assert not _reference_lineage(run)[:, ids].any()
    assert _results(run)["test"]["oracle"]["n"] > 0 and auditing.audit(run)[0]
