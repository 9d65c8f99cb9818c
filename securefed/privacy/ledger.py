"""The privacy ledger: every DP release, recorded before anything that depends on it leaves.

A SQLite database in the run directory (``privacy-ledger.sqlite``):

* WAL journal with ``synchronous=FULL``: a committed transaction survives a
  SIGKILL or power loss, an uncommitted one vanishes whole.
* Versioned schema (``PRAGMA user_version``); events stored as strict JSON
  data (:func:`~securefed.privacy.events.event_to_json`), never pickle.
* A run identity (run id and config fingerprint) in the header; opening the
  ledger of another run, or with another DP config, raises
  :class:`LedgerMismatchError`.
* A hash chain over the rows, anchored in the header and ending in a stored
  head: a truncated file, a deleted or edited row, or rows spliced in from
  another ledger raise :class:`LedgerCorruptError`. Resuming never starts
  from zero by accident.

Two-phase rounds. :meth:`PrivacyLedger.plan` writes the round's *planned*
releases (an upper bound: every sampled client's full local training, the
server's noise) in one transaction before any noise is drawn or any update is
sent; :meth:`PrivacyLedger.commit` replaces them with what actually happened
in one transaction before the new model is released. A round that crashed in
between stays charged at its plan (:meth:`PrivacyLedger.mark_interrupted`), so
spent budget after a resume is never lower than before the crash.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from .accountants import NeighbouringRelation
from .errors import EventDecodeError, LedgerCorruptError, LedgerError, LedgerMismatchError
from .events import DpEvent, event_from_json, event_to_json

LEDGER_FILE = "privacy-ledger.sqlite"
SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_INFO_BYTES = 1 << 16

Level = Literal["sample", "user"]
Status = Literal["planned", "committed", "interrupted"]

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE rounds (
    seq INTEGER PRIMARY KEY,
    round INTEGER NOT NULL CHECK (round >= 0),
    status TEXT NOT NULL CHECK (status IN ('planned', 'committed', 'interrupted')),
    recorded_at TEXT NOT NULL,
    info TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
) STRICT;
CREATE TABLE releases (
    seq INTEGER NOT NULL REFERENCES rounds(seq),
    level TEXT NOT NULL CHECK (level IN ('sample', 'user')),
    subject TEXT NOT NULL,
    relation TEXT NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (seq, level, subject)
) STRICT;
"""


@dataclass(frozen=True)
class Release:
    """One DP release: ``level`` sample (subject = client id) or user (subject = ``server``)."""

    level: Level
    subject: str
    event: DpEvent
    relation: NeighbouringRelation = NeighbouringRelation.ADD_OR_REMOVE_ONE

    def __post_init__(self) -> None:
        if self.level not in ("sample", "user"):
            raise ValueError(f"release level must be 'sample' or 'user', got {self.level!r}")
        if not isinstance(self.event, DpEvent):
            raise TypeError("Release.event must be a DpEvent")

    def row(self) -> tuple[str, str, str, str]:
        return (self.level, self.subject, NeighbouringRelation(self.relation).value, event_to_json(self.event))


@dataclass(frozen=True)
class RoundRecord:
    seq: int
    round: int
    status: Status
    recorded_at: str
    info: Mapping[str, Any]
    releases: tuple[Release, ...]


@dataclass(frozen=True)
class LedgerHeader:
    """Who the ledger belongs to and how its epsilons are to be read."""

    run_id: str
    fingerprint: str
    accountant: str
    delta_sample: float | None
    delta_user: float | None
    config: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(
            {
                "run_id": self.run_id,
                "fingerprint": self.fingerprint,
                "accountant": self.accountant,
                "delta_sample": self.delta_sample,
                "delta_user": self.delta_user,
                "config": dict(self.config),
                "created_at": self.created_at,
                "schema_version": self.schema_version,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> LedgerHeader:
        d = json.loads(text)
        keys = {"run_id", "fingerprint", "accountant", "delta_sample", "delta_user", "config", "created_at", "schema_version"}
        if not isinstance(d, dict) or set(d) != keys:
            raise LedgerCorruptError("ledger header has unexpected fields")
        return cls(**d)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _row_hash(prev: str, seq: int, rnd: int, status: str, at: str, info: str, rel: Sequence[tuple[str, ...]]) -> str:
    body = json.dumps([seq, rnd, status, at, info, sorted(rel)], separators=(",", ":"))
    return _sha(prev + "\n" + body)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _info_json(info: Mapping[str, Any]) -> str:
    text = json.dumps(dict(info), sort_keys=True, separators=(",", ":"), allow_nan=False)
    if len(text) > MAX_INFO_BYTES:
        raise LedgerError(f"round info is larger than {MAX_INFO_BYTES} bytes; record less detail")
    return text


class PrivacyLedger:
    """A verified handle on a run's ledger. Build with :meth:`create` or :meth:`open`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, header: LedgerHeader) -> None:
        self.path = path
        self._conn = conn
        self.header = header

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, header: LedgerHeader) -> PrivacyLedger:
        """Create a new ledger; refuses to overwrite an existing file."""
        path = Path(path)
        if path.exists():
            raise LedgerError(f"{path} already exists; resume the run, or use a new run directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = LedgerHeader(**{**header.__dict__, "created_at": header.created_at or _now()})
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [("header", header.to_json()), ("head", _sha(header.to_json())), ("rows", "0")],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            path.unlink(missing_ok=True)
            raise
        return cls(path, conn, header)

    @classmethod
    def open(cls, path: Path, *, run_id: str | None = None, fingerprint: str | None = None) -> PrivacyLedger:
        """Open and verify an existing ledger; check it belongs to ``run_id`` with ``fingerprint``.

        Raises:
            LedgerCorruptError: missing, truncated, not SQLite, failing the integrity check or the hash chain.
            LedgerMismatchError: another run's ledger, or the same run with a different DP config.
        """
        path = Path(path)
        if not path.is_file():
            raise LedgerCorruptError(
                f"no privacy ledger at {path}: refusing to resume with zero spent budget; "
                "restore the ledger or start a new run"
            )
        with path.open("rb") as fh:
            magic = fh.read(len(_SQLITE_MAGIC))
        if magic != _SQLITE_MAGIC:
            raise LedgerCorruptError(f"{path} is not a SQLite database (truncated or overwritten); refusing to resume")
        try:
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA synchronous=FULL")
            check = conn.execute("PRAGMA integrity_check").fetchall()
            if check != [("ok",)]:
                raise LedgerCorruptError(f"{path} fails SQLite's integrity check: {check[:3]}; refusing to resume")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise LedgerCorruptError(
                    f"{path} has ledger schema version {version}; this securefed reads version {SCHEMA_VERSION}"
                )
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            header = LedgerHeader.from_json(meta["header"])
            ledger = cls(path, conn, header)
            ledger._verify_chain(meta)
        except sqlite3.DatabaseError as err:
            raise LedgerCorruptError(f"{path} is unreadable ({err}); refusing to resume") from None
        except (KeyError, ValueError, TypeError) as err:
            raise LedgerCorruptError(f"{path} has a malformed header ({err}); refusing to resume") from None
        if run_id is not None and header.run_id != run_id:
            raise LedgerMismatchError(
                f"{path} belongs to run {header.run_id!r}, not {run_id!r}; use that run's directory or a new one"
            )
        if fingerprint is not None and header.fingerprint != fingerprint:
            raise LedgerMismatchError(
                f"the DP configuration changed since this run started (fingerprint {header.fingerprint[:12]} "
                f"in the ledger, {fingerprint[:12]} now); resume with the original [dp] settings or start a new run"
            )
        return ledger

    def _verify_chain(self, meta: Mapping[str, str]) -> None:
        prev = _sha(meta["header"])
        n = 0
        for rec, prev_hash, stored, info_text, rows in self._raw_rounds():
            want = _row_hash(prev, rec.seq, rec.round, rec.status, rec.recorded_at, info_text, rows)
            if prev_hash != prev or stored != want:
                raise LedgerCorruptError(
                    f"{self.path}: hash chain breaks at entry {rec.seq} (round {rec.round}); "
                    "rows were edited, removed or copied from another ledger. Refusing to resume"
                )
            prev = stored
            n += 1
        if meta.get("head") != prev or meta.get("rows") != str(n):
            raise LedgerCorruptError(
                f"{self.path}: {n} entries but the header records {meta.get('rows')}; the ledger was truncated. "
                "Refusing to resume"
            )

    # -- reading -----------------------------------------------------------------------------

    def _raw_rounds(self) -> Iterator[tuple[RoundRecord, str, str, str, list[tuple[str, ...]]]]:
        """(record, prev_hash, hash, stored info text, stored release rows) per entry."""
        rounds = self._conn.execute(
            "SELECT seq, round, status, recorded_at, info, prev_hash, hash FROM rounds ORDER BY seq"
        ).fetchall()
        raw: dict[int, list[tuple[str, ...]]] = {}
        for seq, level, subject, relation, event in self._conn.execute(
            "SELECT seq, level, subject, relation, event FROM releases ORDER BY seq, level, subject"
        ):
            raw.setdefault(seq, []).append((level, subject, relation, event))
        known = {r[0] for r in rounds}
        if set(raw) - known:
            raise LedgerCorruptError(f"{self.path}: releases reference missing entries {sorted(set(raw) - known)[:3]}")
        for seq, rnd, status, at, info, prev_hash, h in rounds:
            rows = raw.get(seq, [])
            try:
                releases = tuple(
                    Release(cast(Level, level), subject, event_from_json(event), NeighbouringRelation(relation))
                    for level, subject, relation, event in rows
                )
                record = RoundRecord(seq, rnd, status, at, json.loads(info), releases)
            except (EventDecodeError, ValueError, TypeError) as err:
                raise LedgerCorruptError(f"{self.path}: entry {seq} is unreadable ({err})") from None
            yield record, prev_hash, h, info, rows

    def rounds(self) -> tuple[RoundRecord, ...]:
        """Every entry, in order (planned, committed and interrupted)."""
        return tuple(r for r, *_ in self._raw_rounds())

    def history(self, level: Level) -> dict[str, list[DpEvent]]:
        """subject -> its events in order, counting every entry (a plan is charged until committed)."""
        out: dict[str, list[DpEvent]] = {}
        for rec in self.rounds():
            for r in rec.releases:
                if r.level == level:
                    out.setdefault(r.subject, []).append(r.event)
        return out

    def last_committed_round(self) -> int | None:
        row = self._conn.execute("SELECT MAX(round) FROM rounds WHERE status = 'committed'").fetchone()
        return None if row[0] is None else int(row[0])

    def last_info(self) -> Mapping[str, Any]:
        """The info of the latest committed entry (e.g. the adaptive clip to resume with)."""
        row = self._conn.execute(
            "SELECT info FROM rounds WHERE status = 'committed' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return {} if row is None else json.loads(row[0])

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _head(self, conn: sqlite3.Connection) -> tuple[str, int]:
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('head', 'rows')").fetchall())
        return meta["head"], int(meta["rows"])

    def plan(self, round_index: int, releases: Sequence[Release], info: Mapping[str, Any] | None = None) -> int:
        """Record a round's planned releases (one transaction); returns its entry number."""
        if self._conn.execute("SELECT 1 FROM rounds WHERE status = 'planned'").fetchone():
            raise LedgerError("a planned round is still open; commit it (or mark it interrupted) first")
        info_text = _info_json(info or {})
        rows = [r.row() for r in releases]
        self._unique(rows)
        with self._tx() as c:
            head, n = self._head(c)
            seq = n + 1
            at = _now()
            h = _row_hash(head, seq, round_index, "planned", at, info_text, rows)
            c.execute(
                "INSERT INTO rounds(seq, round, status, recorded_at, info, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                (seq, round_index, "planned", at, info_text, head, h),
            )
            c.executemany("INSERT INTO releases(seq, level, subject, relation, event) VALUES (?,?,?,?,?)",
                          [(seq, *r) for r in rows])
            c.executemany("UPDATE meta SET value = ? WHERE key = ?", [(h, "head"), (str(seq), "rows")])
        return seq

    def commit(self, seq: int, releases: Sequence[Release], info: Mapping[str, Any] | None = None) -> None:
        """Replace entry ``seq``'s plan with the actual releases (one transaction)."""
        info_text = _info_json(info or {})
        rows = [r.row() for r in releases]
        self._unique(rows)
        with self._tx() as c:
            found = c.execute("SELECT round, status, prev_hash FROM rounds WHERE seq = ?", (seq,)).fetchone()
            head, n = self._head(c)
            if found is None or found[1] != "planned" or seq != n:
                raise LedgerError(f"entry {seq} is not the open planned round; nothing committed")
            rnd, _, prev = found
            at = _now()
            h = _row_hash(prev, seq, rnd, "committed", at, info_text, rows)
            c.execute("DELETE FROM releases WHERE seq = ?", (seq,))
            c.executemany("INSERT INTO releases(seq, level, subject, relation, event) VALUES (?,?,?,?,?)",
                          [(seq, *r) for r in rows])
            c.execute(
                "UPDATE rounds SET status = 'committed', recorded_at = ?, info = ?, hash = ? WHERE seq = ?",
                (at, info_text, h, seq),
            )
            c.execute("UPDATE meta SET value = ? WHERE key = 'head'", (h,))

    def mark_interrupted(self) -> list[int]:
        """Close a plan left open by a crash: it stays charged at its planned releases."""
        with self._tx() as c:
            row = c.execute("SELECT seq, round, recorded_at, info, prev_hash FROM rounds WHERE status = 'planned'").fetchone()
            if row is None:
                return []
            seq, rnd, at, info, prev = row
            rows = [tuple(r) for r in c.execute(
                "SELECT level, subject, relation, event FROM releases WHERE seq = ?", (seq,)
            ).fetchall()]
            h = _row_hash(prev, seq, rnd, "interrupted", at, info, rows)
            c.execute("UPDATE rounds SET status = 'interrupted', hash = ? WHERE seq = ?", (h, seq))
            c.execute("UPDATE meta SET value = ? WHERE key = 'head'", (h,))
            return [int(rnd)]

    @staticmethod
    def _unique(rows: Sequence[tuple[str, ...]]) -> None:
        keys = [(r[0], r[1]) for r in rows]
        if len(set(keys)) != len(keys):
            raise LedgerError("a round may record at most one release per (level, subject)")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
