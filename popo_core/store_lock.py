"""Serialise first-time creation of a shared database (an Optuna study storage, an MLflow store).

Two workers that open a new database at the same moment both create its schema and one fails:
on SQLite "duplicate column name" or alembic "expected to match one row"; on PostgreSQL
`duplicate key value violates unique constraint "pg_type_typname_nsp_index"` (two concurrent
CREATE TABLE of one name; seen with two `popo sweep` workers started together). `init_lock(url)`
around the first connection makes one worker create the schema and the others find it done:
a file lock for SQLite, a session-level advisory lock for PostgreSQL. A no-op for other URLs
(MySQL is not covered: start its first worker alone) and for an HTTP tracking server, which
migrates its own store once at start-up.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path


def sqlite_path(uri: str) -> Path | None:
    """The file behind a sqlite:/// URL (None for other URLs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def is_postgres(uri: str) -> bool:
    return uri.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def _key(text: str) -> int:
    """A signed 64-bit advisory-lock key of `text` (PostgreSQL's bigint range)."""
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big", signed=True)


class init_lock:
    """Exclusive lock for the duration of a `with` block, shared by every process opening `uri`."""

    def __init__(self, uri: str, connect_timeout: int = 15):
        self.uri, self.connect_timeout = uri, connect_timeout
        self.lock_path: Path | None = None
        path = sqlite_path(uri)
        if path is not None:
            key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]
            self.lock_path = Path(tempfile.gettempdir()) / f"popo-sqlite-{key}.lock"
        self._fh = None
        self._conn = None
        self._engine = None

    def __enter__(self) -> "init_lock":
        if self.lock_path is not None:
            try:
                import fcntl
            except ImportError:  # no fcntl (Windows): unlocked, as before
                return self
            self._fh = open(self.lock_path, "a")
            fcntl.flock(self._fh, fcntl.LOCK_EX)
        elif is_postgres(self.uri):
            import sqlalchemy
            from sqlalchemy.pool import NullPool

            # Its own connection (NullPool: closed on exit), keyed by the URL without credentials,
            # so only workers of the same database wait for each other.
            self._engine = sqlalchemy.create_engine(self.uri, poolclass=NullPool,
                                                    connect_args={"connect_timeout": self.connect_timeout})
            u = self._engine.url
            where = f"{u.host}:{u.port}/{u.database}"
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _key("popo-init " + where)})
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
        if self._conn is not None:
            self._conn.close()  # a session-level advisory lock ends with its session
            self._engine.dispose()
            self._conn = self._engine = None
