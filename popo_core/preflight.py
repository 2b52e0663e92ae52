"""Checks a command runs before it builds anything: the output directory can be written, the device
exists, the tracking store answers, the rollout engine is installed. Each failure is a one-line
ConfigError naming its setting, raised before a model is loaded or a run is recorded anywhere."""

from __future__ import annotations

import os
from pathlib import Path

from popo_core.errors import ConfigError

TRACKING_TIMEOUT_S = 5.0  # an unreachable server is reported well within 10 s of the start


def output_dir(path: str | Path, key: str = "trainer.output_dir") -> None:
    """`path` is a directory, or can be created as one: its nearest existing ancestor is a writable
    directory."""
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{key}={path}: exists and is not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{key}={path}: directory is not writable")
        return
    for attempt in range(5):
        try:
            return _try_create(p.absolute(), key, path)
        except FileNotFoundError:  # a concurrent check removed a folder it had made above ours: look again
            if attempt == 4:
                raise ConfigError(f"{key}={path}: cannot create it (its parent kept disappearing)") from None


def _try_create(target: Path, key: str, path) -> None:
    missing = [target]
    while not missing[-1].parent.exists():
        missing.append(missing[-1].parent)
    parent = missing[-1].parent
    if not parent.is_dir():
        raise ConfigError(f"{key}={path}: {parent} is not a directory")
    made = []  # only what this call created is removed: a concurrent command may be making the same folders
    try:  # the one sure test (permissions, read-only or virtual file systems): create it, then remove it
        for folder in reversed(missing):
            try:
                folder.mkdir()
                made.append(folder)
            except FileExistsError:  # another process made it meanwhile: its parent is writable
                pass
    except FileNotFoundError as err:
        if not folder.parent.exists():  # a concurrent check removed it: output_dir looks again
            raise
        raise ConfigError(f"{key}={path}: cannot create it ({err.strerror})") from None
    except OSError as err:
        raise ConfigError(f"{key}={path}: cannot create it ({err.strerror})") from None
    finally:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:  # gone already, or another process put something in it
                pass


def device(name: str, key: str = "trainer.device") -> None:
    """`name` (auto, cpu, cuda, cuda:N, mps) names a device this machine has."""
    if name in ("auto", "cpu"):
        return
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={name}: no CUDA device here (torch {torch.__version__}); use cpu or auto")
        index = name.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"{key}={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{key}={name}: no MPS device here; use cpu or auto")
        return
    raise ConfigError(f"{key}={name}: must be auto, cpu, cuda, cuda:N or mps")


def tracking(uri: str | None, key: str = "tracking.uri", timeout_s: float = TRACKING_TIMEOUT_S) -> None:
    """The MLflow store `uri` (None: the default) answers: an HTTP server within `timeout_s`, a
    SQLite or file store in a directory that can be written."""
    from popo_core.tracking import tracking_uri

    resolved = tracking_uri(uri)
    scheme = resolved.partition("://")[0] if "://" in resolved else "file"
    if scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:  # any HTTP answer (even 404 from an older server) proves something listens
            urllib.request.urlopen(resolved.rstrip("/") + "/health", timeout=timeout_s).close()
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(f"{key}={_shown(resolved)}: MLflow server not reachable ({reason}); "
                              "start it, or use tracking.uri=sqlite:///mlflow.db") from None
        return
    if scheme == "sqlite":
        file = resolved.partition(":///")[2]
        folder = Path(file).expanduser().absolute().parent
        if file and file != ":memory:" and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise ConfigError(f"{key}={resolved}: {folder} is not a writable directory")
        return
    if scheme == "file":
        output_dir(resolved.removeprefix("file://") or ".", key=key)


def _shown(uri: str) -> str:
    from popo_core.tracking import redact

    return redact({"u": uri})["u"]


def packaged_model(name: str) -> None:
    """A model shipped in a PyPI package (model.name_or_path=pypi:...): the package is installed and
    popo's model cache can be written (unless it holds the model already)."""
    from popo_core.model import packaged

    if not packaged.is_packaged(name):
        return
    spec = packaged.lookup(name)
    try:
        packaged.gguf_path(spec)
    except packaged.ModelLoadError as err:
        raise ConfigError(str(err)) from None
    root = packaged.cache_root()
    if not any(root.glob(f"{spec.slug}-*/{packaged.MARKER}")):
        output_dir(root, key="POPO_CACHE (popo's model cache)")


def training(cfg) -> None:
    """Everything `popo train` needs from the machine, checked before the model is built."""
    from popo_core.trainer.lifecycle import default_output_dir

    output_dir(cfg.trainer.output_dir or default_output_dir(cfg))
    device(cfg.trainer.device)
    packaged_model(cfg.model.name_or_path)
    if cfg.tracking.enabled:
        tracking(cfg.tracking.uri)
    if cfg.rollout.engine == "vllm":
        from popo_core.rollout.vllm import check_support

        check_support(tensor_parallel_size=cfg.rollout.tensor_parallel_size, sleep_level=cfg.rollout.sleep_level)
