"""The queue's state: one SQL store, reached only through this module (SQLAlchemy Core).

PostgreSQL on a cluster (`FLOWERS_QUEUE_URL=postgresql://…`), SQLite on one machine (the default,
a file per Ray address under ~/.flowers/queues/). Every change of a job's state is one conditional
UPDATE (`… WHERE id = :id AND state IN (:from)`): of two processes racing for the same job (the
dispatcher admitting it, a user stopping it) exactly one wins, on either database.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa

from flowers.config import ConfigError
from jobs.queue.config import DEFAULT_QUEUE, QueueSpec

# states a person sees; ADMITTING is the short step between "picked" and "Ray has it"
WAITING, ADMITTING, RUNNING, RETRYING = "WAITING", "ADMITTING", "RUNNING", "RETRYING"
SUCCEEDED, FAILED, STOPPED = "SUCCEEDED", "FAILED", "STOPPED"
QUEUED = (WAITING, RETRYING)  # not yet handed to Ray
ACTIVE = (ADMITTING, RUNNING)  # hold a slot and CPUs
FINAL = (SUCCEEDED, FAILED, STOPPED)

meta = sa.MetaData()
queues_t = sa.Table(
    "flowers_queues", meta,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("max_running", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False))
jobs_t = sa.Table(
    "flowers_jobs", meta,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # arrival order
    sa.Column("id", sa.String(80), nullable=False, unique=True),
    sa.Column("queue", sa.String(64), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("label", sa.Text, nullable=False),  # short readable entry point: `study --profile smoke`
    sa.Column("entrypoint", sa.Text, nullable=False),
    sa.Column("runtime_env", sa.Text, nullable=False),  # JSON
    sa.Column("driver_cpus", sa.Float, nullable=False),
    sa.Column("need_cpus", sa.Float, nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("ray_id", sa.String(96)),  # the Ray submission id of the current attempt
    sa.Column("submitted_at", sa.Float, nullable=False),
    sa.Column("admitted_at", sa.Float),
    sa.Column("ended_at", sa.Float),
    sa.Column("reason", sa.Text),  # why it waits, or why it was retried
    sa.Column("message", sa.Text),  # the outcome, one line
    sa.Column("stop_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("history", sa.Text, nullable=False))  # JSON list of finished attempts
checks_t = sa.Table(  # environment checks that passed, so each submit does not run one again
    "flowers_checks", meta,
    sa.Column("key", sa.String(400), primary_key=True),
    sa.Column("ok_until", sa.Float, nullable=False))
lease_t = sa.Table(
    "flowers_dispatcher", meta,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("owner", sa.String(160)),
    sa.Column("expires", sa.Float),
    sa.Column("beat", sa.Float))


@dataclass
class Job:
    """One queued job, as its row holds it."""

    seq: int
    id: str
    queue: str
    priority: int
    state: str
    kind: str
    label: str
    entrypoint: str
    runtime_env: str
    driver_cpus: float
    need_cpus: float
    max_retries: int
    attempt: int
    ray_id: str | None
    submitted_at: float
    admitted_at: float | None
    ended_at: float | None
    reason: str | None
    message: str | None
    stop_requested: bool
    history: str

    @classmethod
    def from_row(cls, row: Any) -> "Job":
        m = row._mapping
        return cls(**{f.name: m[f.name] for f in fields(cls)})

    def attempt_id(self, attempt: int | None = None) -> str:
        """The Ray submission id of an attempt: the job id, then `<id>-r1`, `<id>-r2`, … (deterministic)."""
        n = self.attempt if attempt is None else attempt
        return self.id if n == 0 else f"{self.id}-r{n}"

    def as_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["runtime_env"] = json.loads(self.runtime_env)
        d["history"] = json.loads(self.history)
        return d


def default_url(address: str) -> str:
    """One SQLite file per Ray Jobs address, under ~/.flowers/queues/."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", address.split("://")[-1]).strip("_") or "local"
    return f"sqlite:///{Path.home() / '.flowers' / 'queues' / (name + '.db')}"


def resolve_url(url: str | None, address: str) -> str:
    """`url`, else $FLOWERS_QUEUE_URL, else the per-address SQLite file."""
    return url or os.environ.get("FLOWERS_QUEUE_URL") or default_url(address)


def _engine(url: str) -> sa.Engine:
    if url.startswith("postgresql://"):  # SQLAlchemy 2.1 would pick psycopg 3; psycopg2 is what we install
        url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        eng = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(eng, "connect")
        def _wal(dbapi_conn, _rec):  # readers do not block the dispatcher's writes
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
        return eng
    if url.startswith("postgresql"):
        return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2,
                                connect_args={"connect_timeout": 10})
    raise ConfigError(f"queue store {url!r}: use postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///PATH")


def redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


class Store:
    """The queue's tables in the database at `url` (created when missing)."""

    def __init__(self, url: str):
        self.url = url
        self.engine = _engine(url)
        try:
            for _ in range(3):  # two processes creating the tables at once: the loser retries
                try:
                    meta.create_all(self.engine)
                    break
                except sa.exc.IntegrityError:
                    time.sleep(0.5)
                except sa.exc.ProgrammingError as e:
                    if "already exists" not in str(e):
                        raise
                    time.sleep(0.5)
        except sa.exc.OperationalError as e:
            first = str(e.orig if getattr(e, "orig", None) else e).strip().splitlines()[0]
            raise ConfigError(f"cannot open the queue store {redact(url)}: {first}") from None

    # queues
    def set_queues(self, specs: Iterable[QueueSpec]) -> None:
        with self.engine.begin() as c:
            c.execute(queues_t.delete())
            c.execute(queues_t.insert(), [{"name": s.name, "max_running": s.max_running, "priority": s.priority}
                                          for s in specs])

    def queues(self) -> dict[str, QueueSpec]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(queues_t).order_by(queues_t.c.name)).all()
        out = {r.name: QueueSpec(r.name, r.max_running, r.priority) for r in rows}
        out.setdefault(DEFAULT_QUEUE, QueueSpec(DEFAULT_QUEUE))
        return out

    # jobs
    def add(self, **values: Any) -> Job:
        values.setdefault("history", "[]")
        values.setdefault("stop_requested", False)
        with self.engine.begin() as c:
            c.execute(jobs_t.insert().values(**values))
        return self.get(values["id"])

    def get(self, job_id: str) -> Job | None:
        with self.engine.connect() as c:
            row = c.execute(sa.select(jobs_t).where(jobs_t.c.id == job_id)).first()
        return Job.from_row(row) if row else None

    def jobs(self, states: Iterable[str] | None = None, limit: int | None = None) -> list[Job]:
        """Jobs in arrival order (the last `limit` when given)."""
        q = sa.select(jobs_t)
        if states is not None:
            q = q.where(jobs_t.c.state.in_(list(states)))
        if limit:
            q = q.order_by(jobs_t.c.seq.desc()).limit(limit)
        with self.engine.connect() as c:
            out = [Job.from_row(r) for r in c.execute(q).all()]
        return sorted(out, key=lambda j: j.seq)

    def move(self, job_id: str, from_states: Iterable[str], **values: Any) -> bool:
        """Set `values` only if the job is still in one of `from_states`; whether this call did it."""
        with self.engine.begin() as c:
            r = c.execute(jobs_t.update().where(jobs_t.c.id == job_id, jobs_t.c.state.in_(list(from_states)))
                          .values(**values))
        return r.rowcount == 1

    def set(self, job_id: str, **values: Any) -> None:
        with self.engine.begin() as c:
            c.execute(jobs_t.update().where(jobs_t.c.id == job_id).values(**values))

    # the dispatcher's lease: one admitting process at a time
    def take_lease(self, owner: str, ttl_s: float) -> bool:
        """Become (or stay) the dispatcher: one conditional UPDATE, so two contenders never both win."""
        now = time.time()
        with self.engine.begin() as c:
            if c.execute(sa.select(lease_t.c.id).where(lease_t.c.id == 1)).first() is None:
                try:
                    with c.begin_nested():
                        c.execute(lease_t.insert().values(id=1, owner=None, expires=0.0, beat=0.0))
                except sa.exc.IntegrityError:
                    pass
            r = c.execute(lease_t.update().where(lease_t.c.id == 1, sa.or_(lease_t.c.owner == owner,
                                                                            lease_t.c.owner.is_(None),
                                                                            lease_t.c.expires < now))
                          .values(owner=owner, expires=now + ttl_s, beat=now))
        return r.rowcount == 1

    def lease(self) -> tuple[str | None, float]:
        """(owner, expiry) of the dispatcher lease; (None, 0) when none was ever taken."""
        with self.engine.connect() as c:
            row = c.execute(sa.select(lease_t).where(lease_t.c.id == 1)).first()
        return (row.owner, row.expires) if row else (None, 0.0)

    def dispatcher_alive(self) -> bool:
        owner, expires = self.lease()
        return bool(owner) and expires > time.time()

    def release_lease(self, owner: str) -> None:
        with self.engine.begin() as c:
            c.execute(lease_t.update().where(lease_t.c.id == 1, lease_t.c.owner == owner)
                      .values(owner=None, expires=0.0))

    # checks
    def check_passed(self, key: str) -> bool:
        with self.engine.connect() as c:
            row = c.execute(sa.select(checks_t.c.ok_until).where(checks_t.c.key == key[:400])).first()
        return bool(row) and row.ok_until > time.time()

    def remember_check(self, key: str, ttl_s: float) -> None:
        with self.engine.begin() as c:
            c.execute(checks_t.delete().where(checks_t.c.key == key[:400]))
            c.execute(checks_t.insert().values(key=key[:400], ok_until=time.time() + ttl_s))

    def dispose(self) -> None:
        self.engine.dispose()
