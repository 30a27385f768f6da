"""The preference store: labels from humans and AI judges, durable, idempotent, and
readable as training rows (docs/labelers.md).

`PreferenceStore` is the interface the server and the trainer use; `SqliteStore`
is the default: one file (next to the model registry), SQLite in WAL mode with
`synchronous=FULL`, so a commit is on disk (the WAL fsync'd) before `submit`
returns and readers (an export, a training run) never block the writer. A
server database plugs in by implementing the same four methods.

Idempotency: every preference carries a client-chosen `id`. Submitting an id
that is stored with the same content is a no-op counted as a duplicate (a
retried RPC); the same id with different content is a conflict and fails the
whole batch (labels are never silently merged). A batch is one transaction:
all of it is stored or none. Content is what the client sent: a timestamp the
server filled in is not part of it, so a retry stays a duplicate.

Schema migrations are versioned through SQLite's `user_version`: `MIGRATIONS[i]`
takes the schema from version i to i + 1, and opening a store applies the
missing ones in one transaction. A store written by a newer rmserve is refused.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Message = dict[str, str]
Kind = Literal["human", "ai"]
KINDS = ("human", "ai")


class PreferenceConflict(ValueError):
    """An id already stored with different content (maps to ALREADY_EXISTS)."""


class StoreFull(OSError):
    """The store's disk is full: nothing of the batch was stored (RESOURCE_EXHAUSTED)."""


class StoreUnavailable(OSError):
    """The store cannot be written (read-only, I/O error, locked too long): nothing was stored (UNAVAILABLE)."""


@dataclass(frozen=True)
class Preference:
    """One labelled comparison: a prompt, two or more responses, and a choice, a ranking or a tie."""

    id: str
    prompt: str | list[Message]
    responses: list[str]
    choice: int | None = None
    ranking: list[int] | None = None       # ranking[i] is the rank of responses[i]; lower is better
    tie: bool = False
    margin: float | None = None
    labeler: str = ""
    labeler_kind: Kind = "human"
    judge: str = ""
    guideline: str = ""
    rationale: str = ""
    tag: str = ""
    timestamp: float | None = None         # when labelled, as the client said; None: not given
    received: float = field(default=0.0, compare=False)  # when the server stored it

    @property
    def labelled_at(self) -> float:
        return self.timestamp if self.timestamp is not None else self.received

    def content_hash(self) -> str:
        """What identifies the content for idempotency: everything the client sent."""
        content = {k: v for k, v in asdict(self).items() if k != "received"}
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def training_row(self) -> dict[str, Any]:
        """The row in rmserve's training formats (training/data.py), with provenance beside it."""
        row: dict[str, Any] = {"prompt": self.prompt}
        n = len(self.responses)
        if self.choice is not None and n == 2:
            row["chosen"], row["rejected"] = self.responses[self.choice], self.responses[1 - self.choice]
        else:
            if self.choice is not None:
                ranks = [0 if i == self.choice else 1 for i in range(n)]
            elif self.ranking is not None:
                ranks = list(self.ranking)
            else:
                ranks = [0] * n  # a tie: counted by the trainer, no Bradley-Terry signal
            row["responses"], row["ranking"] = list(self.responses), ranks
        if self.tie:
            row["tie"] = True
        if self.margin is not None:
            row["margin"] = self.margin
        row.update(id=self.id, labeler=self.labeler, labeler_kind=self.labeler_kind, labelled_at=self.labelled_at)
        for k in ("judge", "guideline", "rationale", "tag"):
            if getattr(self, k):
                row[k] = getattr(self, k)
        return row


def validate(p: Preference, where: str) -> None:
    """Raises ValueError naming `where` and what is wrong (the server maps it to INVALID_ARGUMENT)."""
    if not p.id or len(p.id) > 256:
        raise ValueError(f"{where}: id must be 1-256 characters (a client-chosen key that makes retries safe)")
    n = len(p.responses)
    if n < 2:
        raise ValueError(f"{where}: needs at least 2 responses, got {n}")
    labels = (p.choice is not None) + (p.ranking is not None) + bool(p.tie)
    if labels != 1:
        raise ValueError(f"{where}: set exactly one of choice, ranking or tie")
    if p.choice is not None and not 0 <= p.choice < n:
        raise ValueError(f"{where}: choice {p.choice} is out of range for {n} responses")
    if p.ranking is not None and len(p.ranking) != n:
        raise ValueError(f"{where}: ranking has {len(p.ranking)} ranks for {n} responses")
    if p.labeler_kind not in KINDS:
        raise ValueError(f"{where}: labeler_kind must be one of {list(KINDS)}, got {p.labeler_kind!r}")
    if not p.labeler:
        raise ValueError(f"{where}: labeler is empty: say who labelled it (provenance)")
    if p.margin is not None and not (p.margin == p.margin and abs(p.margin) < float("inf")):
        raise ValueError(f"{where}: margin must be a finite number")
    if p.timestamp is not None and not (p.timestamp == p.timestamp and abs(p.timestamp) < float("inf")):
        raise ValueError(f"{where}: timestamp_unix must be a finite number of seconds")  # NaN would be stored as NULL
    if isinstance(p.prompt, list):
        for i, m in enumerate(p.prompt):
            if not isinstance(m, dict) or set(m) != {"role", "content"}:
                raise ValueError(f"{where}: prompt message {i} must be {{'role', 'content'}}")


@dataclass(frozen=True)
class SubmitResult:
    accepted: int
    duplicates: int
    total: int


@dataclass(frozen=True)
class Filters:
    kind: str | None = None          # human | ai
    since: float | None = None       # labelled at or after (unix seconds)
    tag: str | None = None
    labeler: str | None = None


class PreferenceStore(Protocol):
    def submit(self, items: Sequence[Preference]) -> SubmitResult: ...
    def query(self, filters: Filters = Filters()) -> Iterator[Preference]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


def _schema_v1(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE preferences (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        content_hash TEXT NOT NULL,
        labeler TEXT NOT NULL,
        labeler_kind TEXT NOT NULL,
        tag TEXT NOT NULL,
        labelled_at REAL NOT NULL,
        received REAL NOT NULL,
        body TEXT NOT NULL)""")
    db.execute("CREATE INDEX preferences_labeler ON preferences (labeler)")
    db.execute("CREATE INDEX preferences_tag ON preferences (tag, labelled_at)")


MIGRATIONS = [_schema_v1]


def _classify(e: Exception, path: Path) -> OSError:
    text = str(e).lower()
    if "full" in text:
        return StoreFull(f"the preference store {path} is on a full disk: nothing of this batch was stored; "
                         "free space and retry")
    return StoreUnavailable(f"the preference store {path} cannot be written ({e}): nothing of this batch was stored")


class SqliteStore:
    """A PreferenceStore in one SQLite file; safe to share between threads of one process,
    and to read from other processes while it writes (WAL)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None  # opened on first use: a store that cannot
        # be opened fails the label calls (UNAVAILABLE), not the server's start

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                     check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit's WAL frames are fsync'd
                self._migrate(db)
            except (sqlite3.Error, OSError) as e:
                raise _classify(e, self.path) from e
            self._conn = db
        return self._conn

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreUnavailable(f"{self.path} has schema version {version}; this rmserve knows up to "
                                   f"{len(MIGRATIONS)}: upgrade rmserve")
        if version == len(MIGRATIONS):
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            for migrate in MIGRATIONS[version:]:
                migrate(db)
            db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def submit(self, items: Sequence[Preference]) -> SubmitResult:
        """Stores the batch in one transaction; returns once it is on disk."""
        now = time.time()
        rows = []
        for p in items:
            stored = Preference(**{**asdict(p), "received": now})
            rows.append((stored, stored.content_hash()))
        accepted = duplicates = 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    seen: dict[str, str] = {}
                    for i, (p, digest) in enumerate(rows):
                        known = seen.get(p.id)
                        if known is None:
                            hit = self._db.execute("SELECT content_hash FROM preferences WHERE id = ?", (p.id,)).fetchone()
                            known = hit[0] if hit else None
                        if known is not None:
                            if known != digest:
                                raise PreferenceConflict(
                                    f"item {i}: id {p.id!r} is already stored with different content; a retry must "
                                    "send the same content, a new label needs a new id (nothing of this batch was stored)"
                                )
                            duplicates += 1
                            continue
                        self._db.execute(
                            "INSERT INTO preferences (id, content_hash, labeler, labeler_kind, tag, labelled_at, received, body)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (p.id, digest, p.labeler, p.labeler_kind, p.tag, p.labelled_at, p.received,
                             json.dumps(asdict(p), ensure_ascii=False)),
                        )
                        seen[p.id] = digest
                        accepted += 1
                    total = self._db.execute("SELECT COUNT(*) FROM preferences").fetchone()[0]
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:  # SQLite already rolled back after some errors (SQLITE_FULL)
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise _classify(e, self.path) from e
        return SubmitResult(accepted, duplicates, total)

    def query(self, filters: Filters = Filters()) -> Iterator[Preference]:
        """Stored preferences in the order they were stored, filtered."""
        where, args = [], []
        if filters.kind:
            where.append("labeler_kind = ?")
            args.append(filters.kind)
        if filters.since is not None:
            where.append("labelled_at >= ?")
            args.append(filters.since)
        if filters.tag:
            where.append("tag = ?")
            args.append(filters.tag)
        if filters.labeler:
            where.append("labeler = ?")
            args.append(filters.labeler)
        sql = "SELECT body FROM preferences" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        with self._lock:
            try:
                bodies = [r[0] for r in self._db.execute(sql, args).fetchall()]
            except sqlite3.Error as e:
                raise _classify(e, self.path) from e
        for body in bodies:
            yield Preference(**json.loads(body))

    def count(self) -> int:
        with self._lock:
            try:
                return self._db.execute("SELECT COUNT(*) FROM preferences").fetchone()[0]
            except sqlite3.Error as e:
                raise _classify(e, self.path) from e

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def training_rows(store: PreferenceStore, filters: Filters = Filters()) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for `training.data.pairs_from_rows`: the store as a training source."""
    for p in store.query(filters):
        yield f"store:{p.id}", p.training_row()
