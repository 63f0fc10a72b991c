"""The trainer's job store: SQLite tables for jobs and their per-job, seq-numbered history.

The trainer service is the only writer (workers report over gRPC), so one connection used from
the event loop's thread is enough; WAL keeps readers cheap. Every history entry (a state change,
a metric point, an event) gets the next `seq` of its job in the same transaction that bumps
`jobs.last_seq`, which is what makes `WatchTrainingJob(after_seq=...)` replay exact.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tunewire import paging
from tunewire import reasons as R
from tunewire.errors import TunewireError

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
STATES = ("QUEUED", "RUNNING", "PUBLISHING", "SUCCEEDED", "FAILED", "CANCELLING", "CANCELLED")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  request_id TEXT UNIQUE,
  spec TEXT NOT NULL,
  state TEXT NOT NULL,
  error TEXT,
  trainable_params INTEGER NOT NULL DEFAULT 0,
  total_params INTEGER NOT NULL DEFAULT 0,
  progress TEXT NOT NULL DEFAULT '{}',
  result TEXT,
  token_hash TEXT NOT NULL,
  create_time REAL NOT NULL,
  start_time REAL,
  end_time REAL,
  last_seq INTEGER NOT NULL DEFAULT 0,
  priority INTEGER NOT NULL DEFAULT 0,
  attempts INTEGER NOT NULL DEFAULT 0,
  worker_pid INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs(create_time DESC, id DESC);
CREATE TABLE IF NOT EXISTS history (
  job_id TEXT NOT NULL REFERENCES jobs(id),
  seq INTEGER NOT NULL,
  time REAL NOT NULL,
  kind TEXT NOT NULL,          -- 'state' | 'metric' | 'event'
  payload TEXT NOT NULL,       -- JSON
  PRIMARY KEY (job_id, seq)
);
"""


MIGRATIONS = [("priority", "INTEGER NOT NULL DEFAULT 0"), ("attempts", "INTEGER NOT NULL DEFAULT 0"),
              ("worker_pid", "INTEGER")]


@dataclass
class Job:
    id: str
    spec: str                      # JobSpec JSON
    state: str                     # one of STATES
    token_hash: str
    create_time: float
    request_id: str | None = None
    error: dict | None = None      # {reason, message, user_error, retryable}
    trainable_params: int = 0
    total_params: int = 0
    progress: dict = field(default_factory=dict)
    result: dict | None = None
    start_time: float | None = None
    end_time: float | None = None
    last_seq: int = 0
    priority: int = 0
    attempts: int = 0              # worker launches so far
    worker_pid: int | None = None  # the running worker's pid (to stop an orphan after a crash)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True)
class Entry:
    seq: int
    time: float
    kind: str
    payload: dict


_JSON_COLS = ("error", "progress", "result")


class JobStore:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        cols = {r["name"] for r in self.db.execute("PRAGMA table_info(jobs)")}
        for col, decl in MIGRATIONS:  # columns added after the first release: stores keep their data
            if col not in cols:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")

    def close(self) -> None:
        self.db.close()

    def _row(self, r: sqlite3.Row) -> Job:
        d = dict(r)
        for c in _JSON_COLS:
            d[c] = json.loads(d[c]) if d[c] else (None if c != "progress" else {})
        return Job(**d)

    def create(self, spec_json: str, token_hash: str, request_id: str | None,
               priority: int = 0) -> tuple[Job, bool]:
        """Inserts a QUEUED job; with a known request_id returns that job instead (created=False)."""
        if request_id:
            r = self.db.execute("SELECT * FROM jobs WHERE request_id=?", (request_id,)).fetchone()
            if r is not None:
                job = self._row(r)
                if json.loads(job.spec) != json.loads(spec_json):
                    raise TunewireError(R.REQUEST_ID_REUSED,
                                        f"request_id {request_id!r} was used for a different job",
                                        metadata={"job": job.id})
                return job, False
        job_id = time.strftime("%Y%m%d") + "-" + uuid.uuid4().hex[:10]
        now = time.time()
        self.db.execute(
            "INSERT INTO jobs(id, request_id, spec, state, token_hash, create_time, priority) "
            "VALUES (?,?,?,?,?,?,?)", (job_id, request_id or None, spec_json, "QUEUED", token_hash, now, priority))
        return self.get(job_id), True

    def find_request(self, request_id: str) -> str | None:
        r = self.db.execute("SELECT id FROM jobs WHERE request_id=?", (request_id,)).fetchone()
        return r["id"] if r else None

    def get(self, job_id: str) -> Job:
        r = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if r is None:
            raise TunewireError(R.JOB_NOT_FOUND, f"training job {job_id!r} not found",
                                metadata={"job": job_id})
        return self._row(r)

    def update(self, job_id: str, **fields) -> Job:
        for c in _JSON_COLS:
            if c in fields and fields[c] is not None:
                fields[c] = json.dumps(fields[c])
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))
        return self.get(job_id)

    def append(self, job_id: str, kind: str, payload: dict, **job_fields) -> Entry:
        """Adds a history entry with the job's next seq (and updates job columns atomically)."""
        now = time.time()
        for c in _JSON_COLS:
            if c in job_fields and job_fields[c] is not None:
                job_fields[c] = json.dumps(job_fields[c])
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            (seq,) = self.db.execute("SELECT last_seq + 1 FROM jobs WHERE id=?", (job_id,)).fetchone()
            self.db.execute("INSERT INTO history(job_id, seq, time, kind, payload) VALUES (?,?,?,?,?)",
                            (job_id, seq, now, kind, json.dumps(payload)))
            sets = ", ".join(["last_seq=?", *(f"{k}=?" for k in job_fields)])
            self.db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (seq, *job_fields.values(), job_id))
        return Entry(seq, now, kind, payload)

    def history(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[Entry]:
        rows = self.db.execute(
            "SELECT seq, time, kind, payload FROM history WHERE job_id=? AND seq>? ORDER BY seq LIMIT ?",
            (job_id, after_seq, limit)).fetchall()
        return [Entry(r["seq"], r["time"], r["kind"], json.loads(r["payload"])) for r in rows]

    def list(self, *, state: str | None = None, page_size: int = 0,
             page_token: str = "") -> tuple[list[Job], str]:
        """Newest first, one page (tunewire/paging.py rules) and the next page's token."""
        scope = f"jobs/{state or 'all'}"  # a token of one filter is refused by another
        size, offset = paging.start(page_size, page_token, scope)
        where, args = ("WHERE state=?", [state]) if state else ("", [])
        rows = self.db.execute(f"SELECT * FROM jobs {where} ORDER BY create_time DESC, id DESC "
                               "LIMIT ? OFFSET ?", (*args, size + 1, offset)).fetchall()
        return [self._row(r) for r in rows[:size]], paging.next_token(scope, offset, size, len(rows) > size)

    def count_by_state(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def queued(self) -> list[Job]:
        """Queued jobs in the order they will run: higher priority first, then oldest first."""
        rows = self.db.execute("SELECT * FROM jobs WHERE state='QUEUED' "
                               "ORDER BY priority DESC, create_time, id").fetchall()
        return [self._row(r) for r in rows]

    def in_states(self, *states: str) -> list[Job]:
        marks = ",".join("?" * len(states))
        rows = self.db.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY create_time, id",
                               states).fetchall()
        return [self._row(r) for r in rows]
