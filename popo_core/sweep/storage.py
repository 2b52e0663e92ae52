"""The Optuna storage of `popo sweep`: a database URL opened with heartbeats and retries.

SQLite suits workers on one machine; workers on several machines share a database server
(PostgreSQL through psycopg 3: `pip install 'popo[postgres]'`). Every message names the URL with
its password masked.
"""

from __future__ import annotations

import warnings
from typing import Any

from popo_core.sweep.space import SweepError
from popo_core.store_lock import init_lock, is_postgres

DEFAULT_STORAGE = "sqlite:///optuna.db"
CONNECT_TIMEOUT_S = 15
# SQLAlchemy's driver module for each URL scheme without "+driver" (2.1 made psycopg 3 the default).
_DRIVER_HINT = {"psycopg": "pip install 'popo[postgres]' (psycopg 3)",
                "psycopg2": "pip install psycopg2-binary, or use postgresql+psycopg:// with pip install 'popo[postgres]'",
                "MySQLdb": "pip install mysqlclient, or use mysql+pymysql:// with pip install pymysql",
                "pymysql": "pip install pymysql"}


def shown(url: str) -> str:
    """The URL as it may be printed or logged: the password masked."""
    from popo_core.tracking import redact

    return redact({"url": url})["url"]


def _masked(text: str, url: str) -> str:
    """`text` with the URL's password masked, wherever a driver's message might repeat it."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        password = None
    text = text.replace(url, shown(url))
    return text.replace(password, "***") if password else text


def open_storage(url: str, heartbeat_interval: int, grace_period: int, max_retry: int):
    """Optuna's RDB storage with heartbeats; a dead worker's trial is queued again with its params."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if "://" not in url:
        raise SweepError(f"--storage {shown(url)}: not a database URL "
                         f"(e.g. {DEFAULT_STORAGE} or postgresql+psycopg://user:pass@host/db)")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # wait for another worker's write instead of failing
    elif is_postgres(url) or url.startswith("mysql"):
        # A server restart or a dropped idle connection: check each pooled connection before use.
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry, inherit_intermediate_values=True)
    try:
        # Two workers creating one new study database would race in its schema (store_lock).
        with init_lock(url, connect_timeout=CONNECT_TIMEOUT_S):
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                              grace_period=grace_period, heartbeat_stale_trial_callback=retry)
    except ImportError as err:  # Optuna re-raises the driver's ModuleNotFoundError as a bare ImportError
        name = err.name or getattr(err.__cause__, "name", None) or "?"
        hint = _DRIVER_HINT.get(name, f"install the Python module {name}")
        raise SweepError(f"--storage {shown(url)}: no database driver {name!r}: {hint}") from None
    except Exception as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
        raise SweepError(_masked(f"--storage {shown(url)}: {type(err).__name__}: {first}", url)) from None
