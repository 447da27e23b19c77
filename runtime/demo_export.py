"""Where the embedded demo model's export is cached (written by `mla-edge demo`, read by generate/bench). Torch-free."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mla_edge.models.demo_path import DEMO_DIR

from .manifest import MANIFEST


def cache_root() -> Path:
    return Path(os.environ.get("MLA_EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mla-edge")


def demo_export_dir() -> Path:
    """One folder per demo-weights version: the hash of the committed safetensors names it."""
    weights = DEMO_DIR / "model.safetensors"
    tag = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "missing"
    return cache_root() / f"demo-{tag}"


def default_export_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    d = demo_export_dir()
    if not (d / MANIFEST).is_file():
        raise FileNotFoundError(f"no OUT_DIR given and the demo model has not been exported yet ({d}): run `mla-edge demo` "
                                "or `mla-edge export` first")
    return d
