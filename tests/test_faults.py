"""Fault injection: a finished run damaged, raced or killed in every way we know, and one
invariant checked after each command. A command that exits 0 leaves `audit` clean and every id
the log had applied still deleted; a refusal (exit 2) changes nothing on disk; a resource
failure (exit 5) loses nothing saved. The heavier kills run with ``-m slow``."""

import hashlib
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import checkpoint_tree, results_of
from jaxunlearn import auditing, checkpoint, cli, deletion_log, driver, faults, forgetting
from jaxunlearn.config import apply_overrides, get_preset
from jaxunlearn.deletion_queue import Forget, Queue

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = {"strategy": "rewind", "keep_checkpoints": 10, "eval_every_epoch": False}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, sample):
    """A finished smoke run (``before``), and its copy after a `forget` of three ids member 0
    saw (``after``)."""
    root = tmp_path_factory.mktemp("pristine")
    before, after = root / "before", root / "after"
    cfg = apply_overrides(get_preset("smoke"), SETTINGS)
    driver.train_and_evaluate(cfg, before, dataset=sample, log=lambda s: None, progress=False)
    shutil.copytree(before, after, ignore=shutil.ignore_patterns(".lock"))
    seen = checkpoint_tree(after)["groups"]["ensemble"]["lineage"]["seen"]
    ids = [int(i) for i in np.flatnonzero(seen[0])[:3]]
    assert forgetting.forget(after, ids, log=lambda s: None, dataset=sample)["status"] == "applied"
    return before, after


@pytest.fixture
def run(tmp_path, pristine):
    out = tmp_path / "run"
    shutil.copytree(pristine[1], out, ignore=shutil.ignore_patterns(".lock"))
    return out


def _digest(folder) -> dict:
    folder = pathlib.Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _applied(run_dir) -> set[int]:
    with deletion_log.DeletionLog.open(run_dir, create=False) as log:
        return set(log.deleted_ids())


def _free(run_dir, n=1) -> list[int]:
    """Ids no request names yet (and none never deletable)."""
    gone = set(checkpoint_tree(run_dir)["deletions"]["ids"])
    with deletion_log.DeletionLog.open(run_dir, create=False) as log:
        gone |= {i for r in log.records() for i in r["ids"]}
    return [i for i in range(300) if i not in gone][:n]


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def check_invariant(run_dir, code: int, before: dict, applied: set[int]) -> None:
    """Exit 0: `audit` clean and every id the log had applied still deleted. Exit 2: nothing
    changed on disk. Exit 5: nothing the log had applied is lost, every checkpoint is whole."""
    if code == 0:
        ok, problems, _ = auditing.audit(run_dir)
        assert ok, problems
        assert applied <= _applied(run_dir) <= set(results_of(run_dir)["deleted_ids"])
    elif code == 2:
        assert _digest(run_dir) == before
    elif code == 5:
        assert applied <= _applied(run_dir)
        ckpts = checkpoint.Checkpoints(run_dir, read_only=True)
        assert ckpts.steps() and all(ckpts.verify(s) is None for s in ckpts.steps())
    else:
        pytest.fail(f"exit {code} is none of the documented statuses")


# ---- damage to the deletion log and the checkpoints' manifests: refused, nothing changed ----

def _older_log(run_dir, before):
    shutil.copy(before / "deletions.sqlite", run_dir / "deletions.sqlite")


REFUSED = {
    "log emptied": lambda r, b: (r / "deletions.sqlite").write_bytes(b""),
    "log deleted": lambda r, b: (r / "deletions.sqlite").unlink(),
    "log replaced by an older copy": _older_log,
    "manifests removed": lambda r, b: shutil.rmtree(r / "checkpoints" / "manifests"),
    "manifests emptied": lambda r, b: [p.unlink() for p in
                                       (r / "checkpoints" / "manifests").iterdir()],
}


@pytest.mark.parametrize("damage", sorted(REFUSED))
def test_a_lost_history_is_refused_by_every_command_and_named_by_the_audit(run, pristine,
                                                                           capsys, damage):
    free, applied = _free(run), _applied(run)
    REFUSED[damage](run, pristine[0])
    before = _digest(run)
    for argv in (["forget", run, "--ids", free[0]], ["run", "--resume", run]):
        code, said = _cli(capsys, *argv)
        assert code == 2, said
        assert ("deletion log" in said if "log" in damage else "manifests" in said), said
        assert "Nothing was changed" in said
        check_invariant(run, code, before, applied)
    code, said = _cli(capsys, "audit", run)
    if "log" in damage:  # (without manifests, no checkpoint counts: nothing to compare)
        assert code == 1 and "deletion log" in said and "lacks" in said, said


# ---- damage to derived files: discarded or written again, and said -----------------------

REPAIRED = {  # damage, the command that meets it, what it says
    "logits truncated": (lambda r: os.truncate(r / "logits.npz", 300), "forget",
                         "logits.npz is damaged"),
    "logits emptied": (lambda r: (r / "logits.npz").write_bytes(b""), "resume",
                       "logits.npz is damaged"),
    "logits garbage": (lambda r: (r / "logits.npz").write_bytes(os.urandom(5000)), "resume",
                       "logits.npz is damaged"),
    "lineage truncated": (lambda r: os.truncate(r / "lineage.npz", 100), "resume",
                          "lineage.npz could not be read"),
    "results emptied": (lambda r: (r / "results.json").write_bytes(b""), "resume",
                        "results.json could not be read"),
    "newest manifest removed": (lambda r: max((r / "checkpoints" / "manifests").iterdir(),
                                              key=lambda p: int(p.stem)).unlink(),
                                "resume", "discarded incomplete checkpoint"),
}


@pytest.mark.parametrize("damage", sorted(REPAIRED))
def test_a_damaged_derived_file_is_recomputed_and_said(run, capsys, damage):
    hurt, command, message = REPAIRED[damage]
    applied = _applied(run)
    hurt(run)
    if damage.startswith(("logits", "lineage")):  # the audit names it, never a traceback
        code, said = _cli(capsys, "audit", run)
        assert code == 1 and damage.split()[0] in said, said
    argv = (["forget", run, "--ids", _free(run)[0]] if command == "forget"
            else ["run", "--resume", run])
    code, said = _cli(capsys, *argv)
    assert code == 0 and message in said, said
    check_invariant(run, code, {}, applied)


def test_the_caches_are_written_whole_or_not_at_all(run, monkeypatch):
    from jaxunlearn import files

    synced = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    files.atomic_write(run / "x.bin", b"abc")
    assert (run / "x.bin").read_bytes() == b"abc" and len(synced) == 2  # the file, the folder

    def half(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        files.atomic_write(run / "x.bin", half)
    assert (run / "x.bin").read_bytes() == b"abc" and not (run / "x.bin.tmp").exists()


# ---- a bad configuration or bad ids: exit 2, nothing recorded ---------------------------

def _edit_config(run_dir, **changes):
    import json

    path = run_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("damage", ["members=0", "members='x'", "not json"])
def test_a_bad_saved_config_is_refused_before_the_request_is_recorded(run, capsys, damage):
    if damage == "not json":
        (run / "config.json").write_text("{members")
    else:
        key, value = damage.split("=")
        _edit_config(run, **{key: eval(value)})
    before, applied = _digest(run), _applied(run)
    code, said = _cli(capsys, "forget", run, "--ids", _free(run)[0])
    assert code == 2 and "config.json" in said, said
    check_invariant(run, code, before, applied)


@pytest.mark.parametrize("ids, message", [("８", "ASCII"), ("1,٣", "ASCII")])
def test_ids_are_ascii_digits(run, capsys, ids, message):
    before = _digest(run)
    code, said = _cli(capsys, "forget", run, "--ids", ids)
    assert code == 2 and message in said
    assert _digest(run) == before


def test_ids_files_are_bounded_and_checked_in_linear_time(tmp_path):
    with pytest.raises(forgetting.RequestError, match="larger than 64 MiB"):
        forgetting.parse_ids(path="/dev/zero")
    many = tmp_path / "ids.txt"
    many.write_text("\n".join(map(str, range(2_000_000))))
    assert len(forgetting.parse_ids(path=many)) == 2_000_000  # (quadratic: hours)
    many.write_text(",".join(map(str, [*range(2_000_000), 7, 11])))
    with pytest.raises(forgetting.RequestError, match=r"\[7, 11\] are listed more than once"):
        forgetting.parse_ids(path=many)
    (tmp_path / "bin").write_bytes(b"12,\xff")
    with pytest.raises(forgetting.RequestError, match="not ASCII"):
        forgetting.parse_ids(path=tmp_path / "bin")


def test_wait_is_a_non_negative_number_of_seconds(run, capsys):
    for bad in ("-5", "nan", "soon"):
        with pytest.raises(SystemExit) as e:
            cli.main(["forget", str(run), "--ids", "8", "--wait", bad])
        assert e.value.code == 2
        assert "seconds >= 0" in capsys.readouterr().err


# ---- races: duplicate ids, and a request as the run exits ---------------------------------

def test_checking_and_recording_a_request_are_one_transaction(tmp_path):
    (tmp_path / "run").mkdir()
    outcomes = {}

    def ask(name, ids, pause):
        def check(taken):
            time.sleep(pause)  # inside the transaction: the other process waits
            overlap = sorted(set(ids) & taken)
            if overlap:
                raise forgetting.RequestError(f"{overlap} already requested")
        with deletion_log.DeletionLog.open(tmp_path / "run") as log:
            try:
                outcomes[name] = log.request(ids, str(Forget()), check=check)
            except forgetting.RequestError as e:
                outcomes[name] = str(e)

    first = threading.Thread(target=ask, args=("first", [211, 212], 0.5))
    first.start()
    time.sleep(0.1)  # the first holds the log's write lock, its check still running
    ask("second", [211, 300], 0.0)
    first.join()
    assert outcomes["first"] == 1 and outcomes["second"] == "[211] already requested"
    with deletion_log.DeletionLog.open(tmp_path / "run") as log:
        assert [r["ids"] for r in log.records()] == [[211, 212]]
        assert len({r["key"] for r in log.records()}) == 1


def test_requests_have_identities_that_a_restarted_log_cannot_repeat(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        with deletion_log.DeletionLog.open(tmp_path / name) as log:
            log.request([1], "forget (command)")
    keys = []
    for name in ("a", "b"):
        with deletion_log.DeletionLog.open(tmp_path / name) as log:
            (record,) = log.records()
            assert record["id"] == 1  # the counter restarts...
            keys.append(record["key"])
    assert keys[0] != keys[1]  # ...the identity does not


def test_a_request_just_before_the_runs_last_check_is_applied_by_the_run(run, sample,
                                                                         monkeypatch):
    free, applied = _free(run), _applied(run)
    close = Queue.close

    def a_request_arrives_first(self, disk):
        with deletion_log.DeletionLog.open(run) as other:  # as another process would
            other.request(free, str(Forget()))
        monkeypatch.setattr(Queue, "close", close)
        return close(self, disk)

    monkeypatch.setattr(Queue, "close", a_request_arrives_first)
    driver.resume(run, dataset=sample, log=lambda s: None, progress=False)
    check_invariant(run, 0, {}, applied | set(free))


def test_a_request_just_after_the_runs_last_check_is_never_told_it_will_be_applied(
        run, sample, monkeypatch):
    free, applied = _free(run, 2), _applied(run)
    close, told = Queue.close, {}

    def a_request_arrives_after(self, disk):
        pending = close(self, disk)
        assert pending == [] and disk.held.record["takes_requests"] is False
        # In this window the run still holds its lock: a forget waits for it (it no longer
        # takes requests), or, when it cannot wait, says the request waits for the next open.
        told["queued"] = forgetting.forget(run, free[:1], log=lambda s: None, dataset=sample,
                                         wait=0.0)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        told["waiting"] = subprocess.Popen(
            [sys.executable, "-m", "jaxunlearn.cli", "forget", str(run), "--ids", str(free[1]),
             "--wait", "300"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        deadline = time.time() + 120
        while len(_pending(run)) < 2 and time.time() < deadline:  # its request is recorded
            time.sleep(0.1)
        return pending

    monkeypatch.setattr(Queue, "close", a_request_arrives_after)
    driver.resume(run, dataset=sample, log=lambda s: None, progress=False)
    assert told["queued"]["status"] == "queued" and "next open" in told["queued"]["message"]
    out, _ = told["waiting"].communicate(timeout=600)
    assert told["waiting"].returncode == 0 and "applied" in out, out
    # Both applied: the second by the waiting forget, the first with it (pending together).
    check_invariant(run, 0, {}, applied | set(free))


def _pending(run_dir) -> list[dict]:
    with deletion_log.DeletionLog.open(run_dir, create=False) as log:
        return log.pending()


# ---- resources: a message naming the resource, nothing saved lost -------------------------

def test_a_full_disk_while_forgetting_keeps_every_checkpoint_and_the_request(run, capsys,
                                                                              monkeypatch):
    import orbax.checkpoint as ocp

    free, applied = _free(run), _applied(run)
    steps = checkpoint.Checkpoints(run).steps()

    def full(manager, step, *args, **kwargs):
        raise ValueError('RESOURCE_EXHAUSTED: Error writing "arrays": Failed to write 62784 '
                         "bytes: No space left on device [os_error_code='28']")

    with monkeypatch.context() as patched:
        patched.setattr(ocp.CheckpointManager, "save", full)
        code, said = _cli(capsys, "forget", run, "--ids", free[0])
    assert code == 5 and "the disk is full" in said and "run --resume" in said, said
    check_invariant(run, code, {}, applied)
    assert checkpoint.Checkpoints(run).steps() == steps
    code, said = _cli(capsys, "run", "--resume", run)  # space again: the request is applied
    check_invariant(run, code, {}, applied | set(free))


def test_a_read_only_run_folder_is_named_and_nothing_changes(run, capsys, monkeypatch):
    before, applied = _digest(run), _applied(run)

    def read_only(self, *args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(deletion_log.DeletionLog, "_insert_request", read_only)
    code, said = _cli(capsys, "forget", run, "--ids", _free(run)[0])
    assert code == 5 and "read-only" in said, said
    check_invariant(run, code, before, applied)
    assert _digest(run) == before


def test_a_new_run_out_of_memory_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from jaxunlearn import trainer

    def oom(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                           "12.3GiB")

    monkeypatch.setattr(trainer.Trainer, "train", oom)
    code, said = _cli(capsys, "run", "--preset", "smoke", "--out", tmp_path / "runs",
                      "--quiet")
    assert code == 5 and "out of memory" in said and "was removed" in said, said
    assert not any((tmp_path / "runs").iterdir())


# ---- kills at the fault points of forget ----------------------------------------------

def _killed_forget(run_dir, ids, point: str):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{faults.ENV_VAR: point})
    return subprocess.run([sys.executable, "-m", "jaxunlearn.cli", "forget", str(run_dir),
                           "--ids", ",".join(map(str, ids))], env=env, capture_output=True,
                          text=True, timeout=600)


KILLS = ["checkpoint.before_write@1", "forget.before_outcome@1"]
SLOW_KILLS = ["train.rewind.step@1",
              "checkpoint.before_manifest@1"]


@pytest.mark.parametrize("point", KILLS + [pytest.param(p, marks=pytest.mark.slow)
                                           for p in SLOW_KILLS])
def test_a_forget_killed_at_a_fault_point_is_finished_by_the_next_open(run, sample, capsys,
                                                                        point):
    seen = checkpoint_tree(run)["groups"]["ensemble"]["lineage"]["seen"]
    free = set(_free(run, 300))
    ids = [int(i) for i in np.flatnonzero(seen[1]) if int(i) in free][:2]
    applied = _applied(run)
    proc = _killed_forget(run, ids, point)
    assert proc.returncode == -9, proc.stderr[-2000:]
    code, said = _cli(capsys, "run", "--resume", run)
    check_invariant(run, code, {}, applied | set(ids))
    assert code == 0


@pytest.mark.slow
def test_a_run_killed_inside_its_pretraining_starts_again(tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{faults.ENV_VAR: "train.pretrain.step@2"})
    proc = subprocess.run([sys.executable, "-m", "jaxunlearn.cli", "run", "--preset", "smoke",
                           "--out", str(tmp_path), "--quiet", "pretrain=60",
                           "strategy=rewind"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    code, said = _cli(capsys, "run", "--resume", run_dir)
    assert code == 0 and "starting it again" in said, said
    check_invariant(run_dir, code, {}, set())


@pytest.mark.slow
@pytest.mark.parametrize("point", ["checkpoint.before_write@1", "checkpoint.before_manifest@1"])
def test_a_fork_killed_while_it_checkpoints_is_finished_by_resuming_the_copy(
        tmp_path, sample, capsys, point):
    source = tmp_path / "source"  # a fork copies a run before its first deletion
    cfg = apply_overrides(get_preset("smoke"), {**SETTINGS, "deletion_rate": 0.0})
    driver.train_and_evaluate(cfg, source, dataset=sample, log=lambda s: None, progress=False)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{faults.ENV_VAR: point})
    proc = subprocess.run([sys.executable, "-m", "jaxunlearn.cli", "fork", str(source),
                           str(tmp_path / "copy"), "strategy=replace"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    code, said = _cli(capsys, "run", "--resume", tmp_path / "copy")
    check_invariant(tmp_path / "copy", code, {}, set())
    assert code == 0 and results_of(tmp_path / "copy")["config"]["strategy"] == "replace"
