"""A durable, append-only log of the deletion requests made against a run: ``run_dir/deletions.sqlite``.

One record per deletion request. A request is written in two parts, linked by the request id:

* ``requests``: what was asked (time, the example ids, where the request came from);
* ``outcomes``: what happened to it (``applied``, ``rejected`` or ``failed``), which ensemble
  members it invalidated, the retraining strategy, its cost, the checkpoints purged and a message.

There are two ways to write a request:

* **Two-phase** (use this for deletions that modify the run): :meth:`DeletionLog.request` before
  applying, :meth:`DeletionLog.outcome` after. If the process dies in between, the request stays
  visible as *pending* (:meth:`DeletionLog.pending`, outcome ``"pending"`` in
  :meth:`DeletionLog.records`) instead of vanishing, so a crash mid-deletion can be detected and
  the deletion redone.
* **One-shot**: :meth:`DeletionLog.record` writes the request and its outcome together, in one
  transaction, once the outcome is known (e.g. a request rejected before anything was touched).

Append-only: records are never updated or deleted. SQLite triggers abort any ``UPDATE`` or
``DELETE`` on either table (``sqlite3.IntegrityError``), and a request has at most one outcome
(checked inside the writing transaction, and by a ``UNIQUE`` constraint). The triggers guard
against mistakes, not against someone who drops them on purpose.

Durability: the default rollback journal (not WAL) with ``PRAGMA synchronous=FULL``, so every
commit is fsynced before it returns and the log is a single self-contained file that can be copied
with the run folder. Each append is one transaction opened with ``BEGIN IMMEDIATE`` (connections
use ``timeout=30``), so writers from several processes wait for each other instead of failing.

Every request has an identity that cannot collide (``uid``, a random UUID): the checkpoints
record the requests they applied by it, so a log that was emptied, deleted or replaced by an
older copy of itself is told apart from the run's own (its counter restarts; its uids do not
match). A request written by schema 1 (before uids) is known by its number.

Checking a request and appending it are one transaction (``request(..., check=...)``): two
processes asking for the same id cannot both pass the check.

The schema version is stored in ``PRAGMA user_version`` (currently 2; a version-1 log gains the
``uid`` column on its first write); a log written by a newer version of jaxunlearn is refused
with a clear error rather than misread. A file that is not a
readable deletion log raises :class:`DeletionLogError`; it is never overwritten or deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import operator
import os
import pathlib
import sqlite3
import urllib.parse
import uuid
from typing import Callable

from jaxunlearn.folder import DELETION_LOG
from jaxunlearn.runlock import check_run_dir

LOG_NAME = DELETION_LOG  # (jaxunlearn.folder)
SCHEMA_VERSION = 2
OUTCOMES = ("applied", "rejected", "failed")
PENDING = "pending"

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26

_SCHEMA = """
CREATE TABLE requests (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    time    TEXT NOT NULL,             -- ISO 8601, UTC
    ids     TEXT NOT NULL,             -- JSON list of example ids
    source  TEXT NOT NULL,             -- who/what asked: CLI, schedule file, API caller...
    uid     TEXT                       -- the request's identity (a UUID; NULL in schema 1)
);
CREATE UNIQUE INDEX requests_uid ON requests(uid);
CREATE TABLE outcomes (
    request_id          INTEGER NOT NULL UNIQUE REFERENCES requests(id),
    time                TEXT NOT NULL, -- ISO 8601, UTC
    outcome             TEXT NOT NULL CHECK (outcome IN ('applied', 'rejected', 'failed')),
    members_invalidated TEXT NOT NULL, -- JSON list of ensemble member indices
    strategy            TEXT NOT NULL,
    cost                TEXT,          -- JSON object or NULL
    checkpoints_purged  TEXT NOT NULL, -- JSON list of checkpoint paths
    message             TEXT NOT NULL
);
CREATE TRIGGER requests_no_update BEFORE UPDATE ON requests
BEGIN SELECT RAISE(ABORT, 'deletion log is append-only: requests cannot be updated'); END;
CREATE TRIGGER requests_no_delete BEFORE DELETE ON requests
BEGIN SELECT RAISE(ABORT, 'deletion log is append-only: requests cannot be deleted'); END;
CREATE TRIGGER outcomes_no_update BEFORE UPDATE ON outcomes
BEGIN SELECT RAISE(ABORT, 'deletion log is append-only: outcomes cannot be updated'); END;
CREATE TRIGGER outcomes_no_delete BEFORE DELETE ON outcomes
BEGIN SELECT RAISE(ABORT, 'deletion log is append-only: outcomes cannot be deleted'); END;
"""


class DeletionLogError(RuntimeError):
    """The deletion log file cannot be used (corrupt, foreign or too new); the message says why."""


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _int_list(values, what: str) -> list[int]:
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{what} must be a list of integers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool):
            raise ValueError(f"{what} must be integers, got {v!r}")
        try:
            out.append(operator.index(v))  # also accepts numpy integers
        except TypeError:
            raise ValueError(f"{what} must be integers, got {v!r}") from None
    return out


def _json_default(obj):
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):  # numpy arrays
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def request_key(request_id: int, uid: str | None) -> str:
    """A request's identity, as checkpoints record it: its UUID, or for a request written
    before requests had one (schema 1), its number."""
    return uid if uid else str(request_id)


def _dumps(value, what: str) -> str:
    try:
        return json.dumps(value, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} cannot be stored as JSON: {e}") from None


class DeletionLog:
    """The deletion log of one run. Open with :meth:`DeletionLog.open`; use as a context manager."""

    def __init__(self, path, create: bool = True):
        self.path = pathlib.Path(path)
        self._conn: sqlite3.Connection | None = None
        self._check_header(create)
        try:
            uri = (f"file:{urllib.parse.quote(self.path.absolute().as_posix())}"
                   f"?mode={'rwc' if create else 'rw'}")
            conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
        except sqlite3.OperationalError as e:
            raise DeletionLogError(f"cannot open deletion log {self.path}: {e}") from None
        self._conn = conn
        try:
            with self._errors():
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                self._init_schema()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, run_dir, create: bool = True) -> "DeletionLog":
        """The log of the run in ``run_dir``; creates it (and its schema) if absent and ``create``."""
        run_dir = check_run_dir(run_dir)
        path = run_dir / LOG_NAME
        if not create and not path.exists():
            raise FileNotFoundError(f"no deletion log at {path} (no deletion was ever "
                                    "requested for this run)")
        return cls(path, create=create)

    # ----------------------------------------------------------------------------- plumbing

    def _not_a_log(self, why: str) -> DeletionLogError:
        return DeletionLogError(f"{self.path} is not a readable deletion log ({why}); it was left "
                                "untouched: move it aside or restore it from a backup")

    def _check_header(self, create: bool):
        # Check the bytes ourselves: SQLite treats some tiny garbage files as empty databases
        # and would write a schema over them.
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(_SQLITE_MAGIC))
        except FileNotFoundError:
            if not create:
                raise FileNotFoundError(f"no deletion log at {self.path}") from None
            return
        except OSError as e:
            raise DeletionLogError(f"cannot read deletion log {self.path}: {e}") from None
        if head and head != _SQLITE_MAGIC:
            raise self._not_a_log("it is not an SQLite database")

    @contextlib.contextmanager
    def _errors(self):
        try:
            yield
        except sqlite3.DatabaseError as e:
            code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF
            if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise self._not_a_log(str(e)) from None
            raise

    @contextlib.contextmanager
    def transaction(self):
        """One write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on any error); other
        writers wait for it, so reads inside it see the log as nobody else can change it until
        the block ends. Yields the connection."""
        conn = self._connection()
        with self._errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DeletionLogError(f"deletion log {self.path} is closed")
        return self._conn

    def _user_version(self) -> int:
        return self._connection().execute("PRAGMA user_version").fetchone()[0]

    def _tables(self) -> set[str]:
        rows = self._connection().execute("SELECT name FROM sqlite_master WHERE type='table'")
        return {r[0] for r in rows}

    def _check_version(self, version: int):
        if version > SCHEMA_VERSION:
            raise DeletionLogError(
                f"deletion log {self.path} has schema version {version}, newer than the version "
                f"{SCHEMA_VERSION} this jaxunlearn understands; upgrade jaxunlearn to read it")
        if version >= 1 and not {"requests", "outcomes"} <= self._tables():
            raise self._not_a_log("its requests/outcomes tables are missing")

    def _init_schema(self):
        version = self._user_version()
        if version != 0:
            self._check_version(version)
            return
        with self.transaction() as conn:  # re-check under the write lock: another process may race
            version = self._user_version()
            if version != 0:
                self._check_version(version)
                return
            if self._tables() - {"sqlite_sequence"}:
                raise self._not_a_log("it is an SQLite database with other tables")
            for statement in _SCHEMA.split(";\n"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _has_uids(self) -> bool:
        return self._user_version() >= 2

    def _upgrade(self, conn) -> None:
        """Inside a write transaction: a schema-1 log gains its ``uid`` column (the rows it
        holds keep their numbers as identity)."""
        if self._user_version() == 1:
            conn.execute("ALTER TABLE requests ADD COLUMN uid TEXT")
            conn.execute("CREATE UNIQUE INDEX requests_uid ON requests(uid)")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "DeletionLog":
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------------------- writing

    def request(self, ids, source: str,
                check: Callable[[set[int]], None] | None = None) -> int:
        """Appends a pending deletion request for example ``ids``; returns its request id.

        ``check(taken)``, when given, runs inside the same write transaction, with the ids of
        every request applied or pending (``taken``); an exception it raises leaves the log
        unchanged. Two processes that check and append the same id are so serialised: the
        second sees the first's request."""
        ids = _int_list(ids, "deletion request ids")
        if not ids:
            raise ValueError("a deletion request needs at least one example id")
        with self.transaction() as conn:
            if check is not None:
                check(self._ids("o.outcome IS NULL OR o.outcome = 'applied'"))
            return self._insert_request(conn, ids, source)

    def outcome(self, request_id: int, outcome: str, members_invalidated=(), strategy: str = "",
                cost: dict | None = None, checkpoints_purged=(), message: str = "") -> None:
        """Appends the outcome of request ``request_id``; a request has at most one outcome."""
        row = self._outcome_row(outcome, members_invalidated, strategy, cost, checkpoints_purged,
                                message)
        request_id = operator.index(request_id)
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone() is None:
                raise ValueError(f"deletion log {self.path} has no request {request_id}")
            existing = conn.execute("SELECT outcome FROM outcomes WHERE request_id = ?",
                                    (request_id,)).fetchone()
            if existing is not None:
                raise ValueError(f"deletion request {request_id} already has an outcome "
                                 f"({existing[0]!r}); the log is append-only")
            self._insert_outcome(conn, request_id, row)

    def record(self, ids, source: str, outcome: str, members_invalidated=(), strategy: str = "",
               cost: dict | None = None, checkpoints_purged=(), message: str = "") -> int:
        """Appends a request together with its outcome, in one transaction; returns its id."""
        ids = _int_list(ids, "deletion request ids")
        if not ids:
            raise ValueError("a deletion request needs at least one example id")
        row = self._outcome_row(outcome, members_invalidated, strategy, cost, checkpoints_purged,
                                message)
        with self.transaction() as conn:
            request_id = self._insert_request(conn, ids, source)
            self._insert_outcome(conn, request_id, row)
            return request_id

    def _insert_request(self, conn, ids: list[int], source: str) -> int:
        self._upgrade(conn)
        cur = conn.execute("INSERT INTO requests (time, ids, source, uid) VALUES (?, ?, ?, ?)",
                           (_now(), json.dumps(ids), str(source), str(uuid.uuid4())))
        return cur.lastrowid

    @staticmethod
    def _outcome_row(outcome, members_invalidated, strategy, cost, checkpoints_purged, message):
        if outcome not in OUTCOMES:
            raise ValueError(f"deletion outcome must be one of {', '.join(OUTCOMES)}; "
                             f"got {outcome!r}")
        if cost is not None and not isinstance(cost, dict):
            raise ValueError(f"deletion cost must be a dict (e.g. {{'member_epochs': 12, "
                             f"'seconds': 3.4}}) or None, got {cost!r}")
        if isinstance(checkpoints_purged, (str, bytes, os.PathLike)):
            raise ValueError("checkpoints_purged must be a list of paths, not a single path")
        return (outcome,
                json.dumps(_int_list(members_invalidated, "members_invalidated")),
                str(strategy),
                None if cost is None else _dumps(cost, "deletion cost"),
                json.dumps([os.fspath(p) if isinstance(p, os.PathLike) else str(p)
                            for p in checkpoints_purged]),
                str(message))

    @staticmethod
    def _insert_outcome(conn, request_id: int, row: tuple):
        conn.execute("INSERT INTO outcomes (request_id, time, outcome, members_invalidated, "
                     "strategy, cost, checkpoints_purged, message) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (request_id, _now(), *row))

    # ----------------------------------------------------------------------------- reading

    def records(self) -> list[dict]:
        """One dict per request, by request id, with its outcome (``"pending"`` if none yet).

        Keys: id, time, ids, source, outcome, outcome_time, members_invalidated, strategy, cost,
        checkpoints_purged, message; the outcome fields other than ``outcome`` are None while
        pending.
        """
        with self._errors():
            uid = "r.uid" if self._has_uids() else "NULL"
            rows = self._connection().execute(
                f"SELECT r.id, {uid}, r.time, r.ids, r.source, o.outcome, o.time, "
                "o.members_invalidated, o.strategy, o.cost, o.checkpoints_purged, o.message "
                "FROM requests r LEFT JOIN outcomes o ON o.request_id = r.id "
                "ORDER BY r.id").fetchall()
        out = []
        for (rid, uid, time, ids, source, outcome, otime, members, strategy, cost, purged,
             message) in rows:
            out.append({
                "id": rid,
                "key": request_key(rid, uid),
                "time": time,
                "ids": json.loads(ids),
                "source": source,
                "outcome": PENDING if outcome is None else outcome,
                "outcome_time": otime,
                "members_invalidated": None if members is None else json.loads(members),
                "strategy": strategy,
                "cost": None if cost is None else json.loads(cost),
                "checkpoints_purged": None if purged is None else json.loads(purged),
                "message": message,
            })
        return out

    def deleted_ids(self) -> list[int]:
        """Sorted union of the example ids of all requests whose outcome is ``applied``."""
        return sorted(self._ids("o.outcome = 'applied'"))

    def _ids(self, where: str) -> set[int]:
        """The union of the example ids of the requests (``r``, with their outcome ``o``)
        that ``where`` selects."""
        with self._errors():
            rows = self._connection().execute(
                "SELECT r.ids FROM requests r LEFT JOIN outcomes o ON o.request_id = r.id "
                f"WHERE {where}").fetchall()
        return {i for (ids,) in rows for i in json.loads(ids)}

    def key(self, request_id: int) -> str:
        """The identity of request ``request_id`` (`request_key`)."""
        uid = "uid" if self._has_uids() else "NULL"
        with self._errors():
            row = self._connection().execute(f"SELECT id, {uid} FROM requests WHERE id = ?",
                                             (request_id,)).fetchone()
        if row is None:
            raise ValueError(f"deletion log {self.path} has no request {request_id}")
        return request_key(*row)

    def pending(self) -> list[dict]:
        """Requests without an outcome (e.g. interrupted by a crash), by request id."""
        return [r for r in self.records() if r["outcome"] == PENDING]


def has_requests(run_dir) -> bool:
    """Whether the run in ``run_dir`` has a deletion log with any request in it (the log is
    neither created nor changed)."""
    if not (check_run_dir(run_dir) / LOG_NAME).exists():
        return False
    with DeletionLog.open(run_dir, create=False) as log:
        return bool(log.records())


# --------------------------------------------------------------------------------- display

def _format_ids(ids) -> str:
    if ids is None:
        return "-"
    shown = ", ".join(str(i) for i in ids[:8])
    return f"{shown}, ... ({len(ids)} ids)" if len(ids) > 8 else shown


def _format_number(x) -> str:
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return f"{x:g}" if isinstance(x, float) else str(x)


def _format_cost(cost) -> str:
    if cost is None:
        return "-"
    if isinstance(cost, dict) and ("member_epochs" in cost or "seconds" in cost):
        parts = []
        if "member_epochs" in cost:
            parts.append(f"{_format_number(cost['member_epochs'])} member-epochs")
        if "seconds" in cost:
            s = cost["seconds"]
            parts.append(f"{s:.1f} s" if isinstance(s, (int, float)) else f"{s} s")
        parts += [f"{k}={json.dumps(v)}" for k, v in cost.items()
                  if k not in ("member_epochs", "seconds")]
        return ", ".join(parts)
    return json.dumps(cost, separators=(",", ":"))


def format_records(records) -> str:
    """A human-readable table of :meth:`DeletionLog.records`, for a ``log`` command."""
    if not records:
        return "no deletion requests recorded"
    header = ("id", "time", "source", "ids", "outcome", "members invalidated", "strategy",
              "cost", "purged", "message")
    rows = []
    for r in records:
        members = r.get("members_invalidated")
        purged = r.get("checkpoints_purged")
        rows.append((
            str(r["id"]),
            r.get("time") or "-",
            r.get("source") or "-",
            _format_ids(r.get("ids")),
            r.get("outcome") or PENDING,
            "-" if members is None else (", ".join(str(m) for m in members) or "none"),
            r.get("strategy") or "-",
            _format_cost(r.get("cost")),
            "-" if purged is None else str(len(purged)),
            " ".join(str(r.get("message") or "").split()) or "-",
        ))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1]

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])
