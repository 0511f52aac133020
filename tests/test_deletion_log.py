"""Tests for the run-folder lock (jaxunlearn.runlock) and the deletion log (jaxunlearn.deletion_log)."""

import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from jaxunlearn.deletion_log import (DeletionLog, DeletionLogError, LOG_NAME, format_records)
from jaxunlearn.runlock import LOCK_NAME, NoRunFolder, RunLocked, read_holder, run_lock

REPO = pathlib.Path(__file__).resolve().parents[1]


def _spawn(code: str, *args) -> subprocess.Popen:
    """Starts ``python -c code args...`` with jaxunlearn importable; stdout is a pipe."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)


def _wait_for_line(proc: subprocess.Popen, expected: str):
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.kill()
        raise AssertionError(f"helper process said {line!r}, stderr: {proc.stderr.read()}")


_HOLD_LOCK = """
    import sys, time
    from jaxunlearn.runlock import run_lock
    with run_lock(sys.argv[1], purpose="test-holder"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    print("released", flush=True)
    time.sleep(float(sys.argv[3]))
"""


@pytest.fixture
def holder_procs():
    procs = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        p.stderr.close()


# ------------------------------------------------------------------------------------ run lock

def test_lock_held_by_other_process_names_holder(tmp_path, holder_procs):
    proc = _spawn(_HOLD_LOCK, tmp_path, 30, 0)
    holder_procs.append(proc)
    _wait_for_line(proc, "locked")
    with pytest.raises(RunLocked) as err:
        with run_lock(tmp_path):
            pass
    msg = str(err.value)
    assert f"pid {proc.pid}" in msg
    assert str(tmp_path) in msg
    assert "test-holder" in msg
    assert "released automatically when that process exits" in msg
    assert err.value.holder["pid"] == proc.pid
    assert read_holder(tmp_path)["purpose"] == "test-holder"


def test_lock_released_when_holder_is_killed(tmp_path, holder_procs):
    proc = _spawn(_HOLD_LOCK, tmp_path, 30, 0)
    holder_procs.append(proc)
    _wait_for_line(proc, "locked")
    with pytest.raises(RunLocked):
        with run_lock(tmp_path):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    with run_lock(tmp_path, purpose="after-kill"):
        holder = read_holder(tmp_path)
        assert holder["pid"] == os.getpid() and holder["purpose"] == "after-kill"
    assert (tmp_path / LOCK_NAME).exists()  # never deleted
    assert (tmp_path / LOCK_NAME).read_text() == ""  # emptied on release


def test_lock_wait_succeeds_once_released(tmp_path, holder_procs):
    proc = _spawn(_HOLD_LOCK, tmp_path, 0.5, 30)  # releases after 0.5 s, then stays alive
    holder_procs.append(proc)
    _wait_for_line(proc, "locked")
    with run_lock(tmp_path, wait=15):
        assert proc.poll() is None  # released by the with block, not by process exit


def test_lock_wait_times_out(tmp_path, holder_procs):
    proc = _spawn(_HOLD_LOCK, tmp_path, 30, 0)
    holder_procs.append(proc)
    _wait_for_line(proc, "locked")
    start = time.monotonic()
    with pytest.raises(RunLocked):
        with run_lock(tmp_path, wait=0.3):
            pass
    assert time.monotonic() - start >= 0.25  # it waited for the lock before giving up


def test_lock_same_process_not_reentrant_and_reusable(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunLocked):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released after the with block
        pass


def test_lock_missing_folder(tmp_path):
    with pytest.raises(NoRunFolder, match="no run folder at"):
        with run_lock(tmp_path / "nope"):
            pass
    assert issubclass(NoRunFolder, FileNotFoundError)
    assert not (tmp_path / "nope").exists()


# --------------------------------------------------------------------------------- deletion log

def test_request_outcome_round_trip(tmp_path):
    with DeletionLog.open(tmp_path) as log:
        rid = log.request([5, 3, 9], source="cli")
        log.outcome(rid, "applied", members_invalidated=[0, 2], strategy="sisa",
                    cost={"member_epochs": 12, "seconds": 3.4},
                    checkpoints_purged=["ckpt/m0_e3", pathlib.Path("ckpt/m2_e1")],
                    message="ok")
    with DeletionLog.open(tmp_path, create=False) as log:
        (rec,) = log.records()
    assert rec["id"] == rid
    assert rec["ids"] == [5, 3, 9] and rec["source"] == "cli"
    assert rec["outcome"] == "applied" and rec["outcome_time"]
    assert rec["members_invalidated"] == [0, 2] and rec["strategy"] == "sisa"
    assert rec["cost"] == {"member_epochs": 12, "seconds": 3.4}
    assert rec["checkpoints_purged"] == ["ckpt/m0_e3", "ckpt/m2_e1"]
    assert rec["message"] == "ok"
    assert (tmp_path / LOG_NAME).exists()


def test_records_ordered_and_one_shot_record(tmp_path):
    with DeletionLog.open(tmp_path) as log:
        a = log.request([1], "a")
        b = log.record([2], "b", "rejected", message="id 2 not in training set")
        c = log.request([3], "c")
        log.outcome(a, "failed", message="boom")
        recs = log.records()
    assert [r["id"] for r in recs] == [a, b, c] and a < b < c
    assert [r["outcome"] for r in recs] == ["failed", "rejected", "pending"]
    assert recs[2]["members_invalidated"] is None and recs[2]["cost"] is None


def test_pending_visible_after_crash(tmp_path):
    proc = _spawn("""
        import os, signal, sys
        from jaxunlearn.deletion_log import DeletionLog
        log = DeletionLog.open(sys.argv[1])
        done = log.request([1, 2], "before-crash")
        log.outcome(done, "applied")
        log.request([7, 8], "crashing")
        os.kill(os.getpid(), signal.SIGKILL)  # dies between request and outcome
    """, tmp_path)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with DeletionLog.open(tmp_path) as log:
        (pending,) = log.pending()
        assert pending["ids"] == [7, 8] and pending["source"] == "crashing"
        assert pending["outcome"] == "pending"
        assert log.deleted_ids() == [1, 2]
        log.outcome(pending["id"], "applied")  # completing it later is allowed
        assert log.pending() == [] and log.deleted_ids() == [1, 2, 7, 8]


@pytest.mark.parametrize("statement", [
    "UPDATE requests SET source = 'x'",
    "DELETE FROM requests",
    "UPDATE outcomes SET outcome = 'rejected'",
    "DELETE FROM outcomes",
])
def test_append_only_triggers(tmp_path, statement):
    with DeletionLog.open(tmp_path) as log:
        log.outcome(log.request([1], "s"), "applied")
    conn = sqlite3.connect(tmp_path / LOG_NAME)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            with conn:
                conn.execute(statement)
    finally:
        conn.close()
    with DeletionLog.open(tmp_path) as log:
        (rec,) = log.records()
    assert rec["source"] == "s" and rec["outcome"] == "applied"


def test_double_and_invalid_outcome_rejected(tmp_path):
    with DeletionLog.open(tmp_path) as log:
        rid = log.request([1], "s")
        with pytest.raises(ValueError, match="must be one of"):
            log.outcome(rid, "done")
        log.outcome(rid, "rejected")
        with pytest.raises(ValueError, match="already has an outcome"):
            log.outcome(rid, "applied")
        with pytest.raises(ValueError, match="no request"):
            log.outcome(rid + 100, "applied")
        with pytest.raises(ValueError):
            log.request([], "s")
        with pytest.raises(ValueError):
            log.request([1.5], "s")
        (rec,) = log.records()
    assert rec["outcome"] == "rejected"


def test_deleted_ids_union_of_applied(tmp_path):
    with DeletionLog.open(tmp_path) as log:
        log.outcome(log.request([5, 1], "s"), "applied")
        log.outcome(log.request([2, 5, 9], "s"), "applied")
        log.outcome(log.request([100], "s"), "rejected")
        log.outcome(log.request([101], "s"), "failed")
        log.request([102], "s")
        assert log.deleted_ids() == [1, 2, 5, 9]


_APPENDER = """
    import sys
    from jaxunlearn.deletion_log import DeletionLog
    run_dir, tag = sys.argv[1], sys.argv[2]
    with DeletionLog.open(run_dir) as log:
        for i in range(50):
            rid = log.request([i], tag)
            log.outcome(rid, "applied", message=f"{tag}-{i}")
"""


def test_concurrent_appends_from_two_processes(tmp_path):
    DeletionLog.open(tmp_path).close()  # schema created up front; also tested racing below
    procs = [_spawn(_APPENDER, tmp_path, tag) for tag in ("p1", "p2")]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    with DeletionLog.open(tmp_path) as log:
        recs = log.records()
    assert len(recs) == 100
    assert len({r["id"] for r in recs}) == 100
    assert all(r["outcome"] == "applied" for r in recs)
    for tag in ("p1", "p2"):
        mine = [r for r in recs if r["source"] == tag]
        assert [r["ids"] for r in mine] == [[i] for i in range(50)]
        assert [r["message"] for r in mine] == [f"{tag}-{i}" for i in range(50)]


def test_concurrent_schema_creation(tmp_path):
    procs = [_spawn(_APPENDER, tmp_path, tag) for tag in ("q1", "q2")]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    with DeletionLog.open(tmp_path) as log:
        assert len(log.records()) == 100


@pytest.mark.parametrize("size", [1, 50, 4096])
def test_corrupt_file_raises_and_is_untouched(tmp_path, size):
    path = tmp_path / LOG_NAME
    data = os.urandom(size)
    path.write_bytes(data)
    with pytest.raises(DeletionLogError, match="not a readable deletion log") as err:
        DeletionLog.open(tmp_path)
    assert str(path) in str(err.value)
    assert path.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOG_NAME]


def test_corrupt_sqlite_body_raises(tmp_path):
    with DeletionLog.open(tmp_path) as log:
        log.request([1], "s")
    path = tmp_path / LOG_NAME
    data = bytearray(path.read_bytes())
    data[100:] = os.urandom(len(data) - 100)  # keep the header magic, scramble the rest
    path.write_bytes(bytes(data))
    with pytest.raises(DeletionLogError, match="not a readable deletion log"):
        with DeletionLog.open(tmp_path) as log:
            log.records()
    assert path.read_bytes() == bytes(data)


def test_foreign_and_newer_databases_refused(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    conn = sqlite3.connect(foreign / LOG_NAME)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(DeletionLogError, match="other tables"):
        DeletionLog.open(foreign)

    newer = tmp_path / "newer"
    newer.mkdir()
    DeletionLog.open(newer).close()
    conn = sqlite3.connect(newer / LOG_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(DeletionLogError, match="schema version 99"):
        DeletionLog.open(newer)


def test_open_missing(tmp_path):
    with pytest.raises(NoRunFolder, match="no run folder"):
        DeletionLog.open(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no deletion log"):
        DeletionLog.open(tmp_path, create=False)
    assert not (tmp_path / LOG_NAME).exists()


def test_format_records(tmp_path):
    assert format_records([]) == "no deletion requests recorded"
    with DeletionLog.open(tmp_path) as log:
        assert format_records(log.records()) == "no deletion requests recorded"
        log.outcome(log.request(list(range(20)), "cli"), "applied", members_invalidated=[0, 3],
                    strategy="sisa", cost={"member_epochs": 12, "seconds": 3.4},
                    checkpoints_purged=["a", "b", "c"], message="done\nwell")
        log.outcome(log.request([7], "api"), "rejected", cost={"gpu_hours": 1},
                    message="unknown id")
        log.request([8, 9], "api")
        text = format_records(log.records())
    lines = text.splitlines()
    assert len(lines) == 2 + 3
    for col in ("id", "time", "source", "ids", "outcome", "members invalidated", "strategy",
                "cost", "purged", "message"):
        assert col in lines[0]
    assert [ln.split()[2] for ln in lines[2:]] == ["cli", "api", "api"]
    assert "0, 1, 2, 3, 4, 5, 6, 7, ... (20 ids)" in lines[2]
    assert "12 member-epochs, 3.4 s" in lines[2]
    assert "0, 3" in lines[2] and "sisa" in lines[2] and "done well" in lines[2]
    assert json.dumps({"gpu_hours": 1}, separators=(",", ":")) in lines[3]
    assert "pending" in lines[4] and "8, 9" in lines[4]
    # columns line up: every row's outcome starts at the header's outcome column
    col = lines[0].index("outcome")
    assert [ln[col:].split()[0] for ln in lines[2:]] == ["applied", "rejected", "pending"]
