"""Durability: checkpoints, exact resume after SIGKILL, forget/audit/log, faults, bad input."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxunlearn import checkpoint, cli, data, deletion_log, experiment, faults, requests, runlock
from jaxunlearn.config import ConfigError, apply_overrides, get_preset
from jaxunlearn.group import TrainingDiverged

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The killed runs and the in-process references share this configuration.
KILL_SETTINGS = ["checkpoint_every=3", "strategy=rewind", "keep_checkpoints=3"]


@pytest.fixture(scope="module")
def sample():
    return data.load_sample()


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


def _final_state(run_dir):
    ckpts = checkpoint.Checkpoints(run_dir, read_only=True)
    try:
        return ckpts.load(ckpts.steps()[-1], ("state", "lineage"))
    finally:
        ckpts.close()


def _same_tree(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _results(run_dir):
    return json.loads((pathlib.Path(run_dir) / "results.json").read_text())


def _tree_digest(folder) -> dict:
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _cache_env(folder) -> dict:
    """A shared persistent compilation cache: each fresh process compiles less."""
    return {"JAX_COMPILATION_CACHE_DIR": str(folder),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def _cli_run(out, *settings, faults_spec="", tmp_cache=None):
    """`jaxunlearn run --preset smoke` in a fresh process (SIGKILLed at ``faults_spec``)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(faults.ENV_VAR, None)
    if faults_spec:
        env[faults.ENV_VAR] = faults_spec
    if tmp_cache:
        env.update(_cache_env(tmp_cache))
    proc = subprocess.run([sys.executable, "-m", "jaxunlearn.cli", "run", "--preset", "smoke",
                           "--out", str(out), "--quiet", *settings], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample):
    """The uninterrupted run every killed-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cfg = apply_overrides(get_preset("smoke"), KILL_SETTINGS)
    experiment.run(cfg, out, dataset=sample, log=lambda s: None, progress=False)
    return out


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.mark.parametrize("fault", [
    "phase.step@8",  # mid-phase 1, after a mid-phase checkpoint (every 3 steps)
    "checkpoint.before_manifest@4",  # mid-checkpoint: orbax wrote it, its manifest never came
    "checkpoint.before_purge@2",  # a deletion checkpointed, its purge and log outcome not yet
])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, sample, reference,
                                                         jax_cache, fault):
    proc = _cli_run(tmp_path, *KILL_SETTINGS, faults_spec=fault, tmp_cache=jax_cache)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed by SIGKILL
    (run_dir,) = tmp_path.iterdir()
    assert not _results(run_dir)["complete"]
    messages = []
    exp = experiment.resume(run_dir, dataset=sample, log=messages.append, progress=False)
    try:
        exp.run_all()
    finally:
        exp.close()
    assert any("resuming" in m for m in messages)
    if "manifest" in fault:
        assert any("discarded incomplete checkpoint" in m for m in messages)
    got, want = _results(run_dir), _results(reference)
    assert got["complete"]
    for key in ("final", "forget", "retain", "test", "mia", "cost", "deleted_ids",
                "lineage_audit", "phases"):
        assert _strip(got[key]) == _strip(want[key]), key
    assert _same_tree(_final_state(run_dir), _final_state(reference))
    lines = [_strip(json.loads(l)) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines == [_strip(json.loads(l)) for l in
                     (reference / "metrics.jsonl").read_text().splitlines()]
    ok, problems, summary = requests.audit(run_dir)
    assert ok, problems
    records = deletion_log.DeletionLog.open(run_dir, create=False).records()
    assert [r["outcome"] for r in records] == ["applied", "applied"]


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, sample, reference):
    cfg = apply_overrides(get_preset("smoke"), KILL_SETTINGS)
    exp = experiment.prepare(cfg, tmp_path / "run", dataset=sample, log=lambda s: None,
                             progress=False)
    exp.run_phase(1)
    exp.run_phase(2)
    exp.close()
    ckpts = checkpoint.Checkpoints(tmp_path / "run")
    newest = ckpts.steps()[-1]
    victim = max((p for p in (ckpts.root / str(newest)).rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    messages = []
    exp = experiment.resume(tmp_path / "run", dataset=sample, log=messages.append,
                            progress=False)
    try:
        assert exp.ckpt_step < newest
        exp.run_all()
    finally:
        exp.close()
    assert any(f"checkpoint {newest} is damaged" in m and "falling back" in m for m in messages)
    assert _strip(_results(tmp_path / "run")["final"]) == _strip(_results(reference)["final"])
    assert _same_tree(_final_state(tmp_path / "run"), _final_state(reference))


@pytest.fixture
def finished(tmp_path, sample):
    cfg = _cfg(strategy="rewind", keep_checkpoints=10)
    out = tmp_path / "run"
    experiment.run(cfg, out, dataset=sample, log=lambda s: None, progress=False)
    return out


def test_forget_then_audit_is_clean_and_purges_checkpoints_that_held_the_ids(finished, sample):
    lineage = _final_state(finished)["lineage"]["ensemble"]["seen"]
    ids = [int(i) for i in np.flatnonzero(lineage[0])[:3]]  # member 0 trained on them
    before = checkpoint.Checkpoints(finished).steps()
    outcome = requests.forget(finished, ids, log=lambda s: None, dataset=sample)
    assert outcome["status"] == "applied"
    assert 0 in outcome["record"]["invalidated"]
    results = _results(finished)
    assert set(ids) <= set(results["deleted_ids"]) and results["lineage_audit"]["ok"]
    assert results["requests"][-1]["ids"] == sorted(ids)
    ok, problems, summary = requests.audit(finished)
    assert ok, problems
    assert summary.startswith("ok:")
    after = checkpoint.Checkpoints(finished).steps()
    assert len(after) < len(before) + 1  # checkpoints that held the ids were purged
    for step in after:
        seen = checkpoint.Checkpoints(finished).load(step, ("lineage",))["lineage"]
        assert not np.asarray(seen["ensemble"]["seen"])[:, ids].any()
    (record,) = [r for r in deletion_log.DeletionLog.open(finished).records()
                 if r["source"].startswith("forget")]
    assert record["outcome"] == "applied" and record["checkpoints_purged"]
    assert record["ids"] == ids and 0 in record["members_invalidated"]


def test_audit_fails_on_a_kept_checkpoint_that_holds_a_deleted_id(finished, sample, capsys):
    ckpts = checkpoint.Checkpoints(finished)
    lineage = ckpts.load(ckpts.steps()[-1], ("lineage",))["lineage"]["ensemble"]["seen"]
    ids = [int(np.flatnonzero(lineage[1])[0])]
    # Keep a copy of every checkpoint, forget, then put the purged ones back.
    saved = finished.parent / "saved"
    shutil.copytree(ckpts.root, saved)
    requests.forget(finished, ids, log=lambda s: None, dataset=sample)
    for step_dir in saved.iterdir():
        if step_dir.name.isdigit() and not (ckpts.root / step_dir.name).exists():
            shutil.copytree(step_dir, ckpts.root / step_dir.name)
            shutil.copy(saved / "manifests" / f"{step_dir.name}.json", ckpts.manifests)
    assert cli.main(["audit", str(finished)]) == 1
    out = capsys.readouterr().out
    assert "still depends on deleted id(s)" in out and f"{ids[0]}" in out
    assert "FAILED" in out


def test_concurrent_forget_calls_leave_a_consistent_log(finished, jax_cache):
    lineage = _final_state(finished)["lineage"]["ensemble"]["seen"]
    free = [int(i) for i in np.flatnonzero(lineage.any(axis=0))]
    env = dict(os.environ, PYTHONPATH=str(ROOT), **_cache_env(jax_cache))
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
    assert requests.audit(finished)[0]


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
    with runlock.run_lock(finished, purpose="run"):
        with pytest.raises(runlock.RunLocked, match="in use by another process"):
            experiment.resume(finished, dataset=sample, log=lambda s: None)
        # A forget on a run in progress is recorded and queued, not applied.
        free = int(np.flatnonzero(~np.isin(np.arange(300), _results(finished)["deleted_ids"]))[0])
        outcome = requests.forget(finished, [free], log=lambda s: None, dataset=sample)
        assert outcome["status"] == "queued" and "applies request" in outcome["message"]
    assert not requests.audit(finished)[0]  # pending: not applied yet
    exp = experiment.resume(finished, dataset=sample, log=lambda s: None, progress=False)
    try:
        exp.run_all()  # a finished run applies its queued requests
    finally:
        exp.close()
    assert free in _results(finished)["deleted_ids"]
    assert requests.audit(finished)[0]


def test_resume_refuses_a_changed_config_and_says_which_fields(finished, sample):
    before = _tree_digest(finished)
    with pytest.raises(ConfigError, match=r"epochs: 1 -> 2.*--allow-config-change"):
        experiment.resume(finished, ["epochs=2"], dataset=sample)
    with pytest.raises(ConfigError, match="cannot resume .* different members"):
        experiment.resume(finished, ["members=5"], allow_config_change=True, dataset=sample)
    with pytest.raises(data.DataError):  # the data is missing
        experiment.resume(finished, ["data=/nonexistent/cifar"], allow_config_change=True)
    other = data.load_sample().limit(200, 100)
    with pytest.raises(data.DataError, match="not the data"):
        experiment.resume(finished, dataset=other)
    assert _tree_digest(finished) == before
    exp = experiment.resume(finished, ["mia_folds=3"], allow_config_change=True,
                            dataset=sample, log=lambda s: None)
    exp.close()


def test_nan_loss_stops_the_phase_and_keeps_the_last_good_checkpoint(tmp_path, sample):
    cfg = _cfg(learning_rate=1e38, optimizer="sgd", phases=2, checkpoint_every=2)
    with pytest.raises(TrainingDiverged) as caught:
        experiment.run(cfg, tmp_path / "run", dataset=sample, log=lambda s: None)
    e = caught.value
    assert e.members and e.step >= 1 and "--resume" in str(e)
    results = _results(tmp_path / "run")
    assert not results["complete"]
    assert results["error"]["kind"] == "diverged" and results["error"]["members"] == e.members
    ckpts = checkpoint.Checkpoints(tmp_path / "run")
    step, loaded = ckpts.load_latest(lambda s: None)
    for leaf in jax.tree.leaves(loaded["state"]):
        if np.issubdtype(np.asarray(leaf).dtype, np.floating):
            assert np.isfinite(leaf).all()


def test_a_disk_error_while_writing_keeps_the_previous_checkpoint(tmp_path, sample, monkeypatch):
    exp = experiment.prepare(_cfg(), tmp_path / "run", dataset=sample, log=lambda s: None,
                             progress=False)
    exp.run_phase(1)
    good = exp.ckpts.steps()[-1]

    def full_disk(*args, **kwargs):
        (exp.ckpts.root / "99").mkdir()  # a partial write
        (exp.ckpts.root / "99" / "junk").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exp.ckpts.manager, "save", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="No space left.*intact"):
        exp.run_phase(2)
    exp.close()
    ckpts = checkpoint.Checkpoints(tmp_path / "run")
    step, _ = ckpts.load_latest(lambda s: None)
    assert step == good


def test_log_command_prints_every_request(finished, capsys):
    assert cli.main(["log", str(finished)]) == 0
    out = capsys.readouterr().out
    assert "schedule (after phase 1)" in out or "applied" in out
    assert cli.main(["log", str(finished.parent / "missing")]) == 2


def test_falling_back_past_an_applied_forget_deletes_its_ids_again(finished, sample):
    seen = _final_state(finished)["lineage"]["ensemble"]["seen"]
    ids = [int(i) for i in np.flatnonzero(~seen.any(axis=0))[:2]]  # no member holds them
    assert requests.forget(finished, ids, log=lambda s: None, dataset=sample)["status"] == "applied"
    ckpts = checkpoint.Checkpoints(finished)
    newest = ckpts.steps()[-1]
    victim = next(p for p in (ckpts.root / str(newest)).rglob("*") if p.is_file()
                  and p.stat().st_size > 100)
    victim.write_bytes(b"\0" * victim.stat().st_size)  # corrupted, same size
    messages = []
    exp = experiment.resume(finished, dataset=sample, log=messages.append, progress=False)
    try:
        assert set(ids) <= set(exp.all_deleted)
        exp.run_all()
    finally:
        exp.close()
    assert any("does not match its checksum" in m for m in messages)
    assert any("deleting them again" in m for m in messages)
    assert set(ids) <= set(_results(finished)["deleted_ids"])
    assert requests.audit(finished)[0]


def test_sigkill_inside_a_slice_of_the_shards_plan_resumes_exactly(tmp_path, sample, jax_cache):
    settings = ["plan=shards", "fraction=1", "slices=2", "strategy=rewind", "checkpoint_every=2",
                "keep_checkpoints=3"]
    reference = tmp_path / "reference"
    experiment.run(apply_overrides(get_preset("smoke"), settings), reference, dataset=sample,
                   log=lambda s: None, progress=False)
    killed = tmp_path / "killed"
    proc = _cli_run(killed, *settings, faults_spec="phase.step@9", tmp_cache=jax_cache)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (run_dir,) = killed.iterdir()
    exp = experiment.resume(run_dir, dataset=sample, log=lambda s: None, progress=False)
    try:
        assert exp.position is not None  # inside a phase
        exp.run_all()
    finally:
        exp.close()
    got, want = _results(run_dir), _results(reference)
    for key in ("final", "forget", "retain", "test", "mia", "cost", "phases", "lineage_audit"):
        assert _strip(got[key]) == _strip(want[key]), key
    assert _same_tree(_final_state(run_dir), _final_state(reference))
