"""Reading an export folder through its manifest, `mla_edge.json`: validation, file hashes, and where exports live.

The runtime and the Android demo read nothing else (no torch, no config.json). The schema's names are in
`mla_edge.contract`.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from mla_edge.contract import (
    DYNAMIC_INPUTS,
    DYNAMIC_OUTPUTS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    InputError,
)
from mla_edge.manifest_schema import problems
from mla_edge.models import DEMO_DIR

ORT_OPTIMIZATION = "all"  # the level .ort companions are written at


class ManifestError(InputError):
    """An export folder that cannot be trusted; the message names the file or field."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(folder: Path, precision: str, names: list[str]) -> dict:
    """A model file (plus any external-data files) with sizes and hashes."""
    files = [{"path": n, "bytes": (folder / n).stat().st_size, "sha256": sha256(folder / n)} for n in names]
    return {"precision": precision, "path": names[0], "bytes": sum(f["bytes"] for f in files), "files": files}


def ort_target() -> dict:
    """What an ORT-format file optimized here is tied to: onnxruntime's version, the machine and the level."""
    return {
        "onnxruntime": ort.__version__,
        "platform": f"{platform.system()}-{platform.machine()}",
        "optimization": ORT_OPTIMIZATION,
    }


def _paths(data: dict) -> list[tuple[str, str]]:
    """Every file name a manifest holds: (its field, the name) — each "path" under files and static, and the
    tokenizer."""
    out: list[tuple[str, str]] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "path":
                    out.append((f"{where}.path", v if isinstance(v, str) else repr(v)))
                else:
                    walk(v, f"{where}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")

    walk(data.get("files", {}), "files")
    walk(data.get("static", {}), "static")
    if isinstance(data.get("tokenizer"), str):
        out.append(("tokenizer", data["tokenizer"]))
    return out


def _outside(folder: Path, name: str) -> str | None:
    """Why `name` leaves `folder` (None when it stays inside): absolute, '..', or a link that points out."""
    p = Path(name)
    if p.is_absolute():
        return "an absolute path"
    if ".." in p.parts:
        return "a path through '..'"
    root = folder.resolve()
    if not (folder / p).resolve().is_relative_to(root):
        return "a link that points out of the folder"
    return None


@dataclass(frozen=True)
class Manifest:
    data: dict
    folder: Path

    @classmethod
    def read(cls, folder: str | Path) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ManifestError(
                f"{folder} is not an mla-edge export folder: {MANIFEST} is missing (run `mla-edge export` first)"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError(f"{path}: field 'format' is not {FORMAT!r}: not an mla-edge manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                f"{path}: format_version {data.get('format_version')!r} is not supported (this runtime "
                f"reads {FORMAT_VERSION}): export the model again with this version of mla-edge"
            )
        wrong = problems(data)  # the one schema every writer and reader shares (mla_edge.manifest_schema)
        if wrong:
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            raise ManifestError(f"{path}: field {wrong[0]}{more}")
        for where, name in _paths(data):
            outside = _outside(folder, name)
            if outside:
                raise ManifestError(
                    f"{path}: field {where!r} is {name!r}, {outside}: a manifest's files must stay inside its folder"
                )
        return cls(data, folder)

    @property
    def precisions(self) -> list[str]:
        return list(self.data["files"])

    def ort_mismatch(self, precision: str) -> str | None:
        """Why this precision's ORT-format file cannot be used here (None when it can): it was optimized for another
        onnxruntime version, machine or optimization level."""
        entry = self.data["files"].get(precision, {}).get("ort")
        if not entry:
            return "no .ort file for this precision"
        here = ort_target()
        diff = [f"{k} {entry.get(k)} (here {v})" for k, v in here.items() if entry.get(k) != v]
        return f"{entry['path']} was optimized for " + ", ".join(diff) if diff else None

    def model_path(self, precision: str, verify: bool | str = True, ort_format: bool = False) -> Path:
        """Path of one precision's model file (or its ORT-format companion); with verify, the sha256 of every file
        of that precision (the .onnx, any external data, the .ort) is checked first."""
        if precision not in self.data["files"]:
            raise ManifestError(f"precision {precision!r} is not in this export (has: {', '.join(self.precisions)})")
        entry = self.data["files"][precision]
        path = self.verified_path(entry, verify)
        return self.folder / entry["ort"]["path"] if ort_format else path

    def verified_path(self, entry: dict, verify: bool | str = True) -> Path:
        """A manifest file entry's path, after checking that all its files (graph, external data, .ort) exist and,
        with verify, match their sha256: a tampered export is refused whole. verify=True trusts a file hashed
        before while its size, mtime and inode are unchanged (`verified.json` in the cache folder); "full" always
        hashes."""
        for f in entry["files"] + ([entry["ort"]] if entry.get("ort") else []):
            p = self.folder / f["path"]
            if not p.is_file():
                raise ManifestError(f"model file {p} listed in {MANIFEST} is missing")
            if verify and not (verify != "full" and _trusted(p, f["sha256"])):
                if sha256(p) != f["sha256"]:
                    raise ManifestError(
                        f"model file {p} does not match its sha256 in {MANIFEST}: it was changed or corrupted"
                    )
                _remember(p, f["sha256"])
        return self.folder / entry["path"]

    @property
    def past_names(self) -> list[str]:
        return [v["name"] for v in self.data["graph"]["inputs"][len(DYNAMIC_INPUTS) :]]

    @property
    def present_names(self) -> list[str]:
        return [v["name"] for v in self.data["graph"]["outputs"][len(DYNAMIC_OUTPUTS) :]]

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.data.get("tokenizer")
        return self.folder / name if name else None


def check_written(data: dict) -> None:
    """A writer's check before a manifest reaches the disk: one that breaks the schema is a bug in mla-edge."""
    wrong = problems(data)
    if wrong:
        raise RuntimeError(f"mla-edge wrote a manifest that breaks its schema: {'; '.join(wrong[:5])}")


def record_file(folder: Path, section: str, key: str, path: Path, **extra: object) -> dict:
    """List a companion file (a GGUF, a genai graph) in the manifest under section/key with its size and sha256;
    the manifest is rewritten atomically. Returns the entry."""
    manifest = folder / MANIFEST
    data = json.loads(manifest.read_text())
    entry = {"path": path.name, "bytes": path.stat().st_size, "sha256": sha256(path), **extra}
    data.setdefault(section, {})[key] = entry
    check_written(data)
    tmp = folder / f".{MANIFEST}.partial"
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(manifest)
    return entry


def _stamp(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _verified_file() -> Path:
    return cache_root() / "verified.json"


def _trusted(p: Path, digest: str) -> bool:
    """Was `p` hashed to `digest` before, and are its size, mtime and inode what they were then?"""
    try:
        seen = json.loads(_verified_file().read_text()).get(str(p.resolve()))
        return seen is not None and seen["sha256"] == digest and seen["stamp"] == _stamp(p)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return False


def _remember(p: Path, digest: str) -> None:
    """Record a full hash check (best effort: a read-only cache folder just means hashing again next time)."""
    path = _verified_file()
    try:
        seen = json.loads(path.read_text()) if path.is_file() else {}
        seen = seen if isinstance(seen, dict) else {}
        seen[str(p.resolve())] = {"sha256": digest, "stamp": _stamp(p)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".verified.{os.getpid()}.json")
        tmp.write_text(json.dumps(seen))
        tmp.replace(path)
    except (OSError, ValueError):
        pass


def cache_root() -> Path:
    """Where mla-edge keeps exports it made for itself: $MLA_EDGE_CACHE, else $XDG_CACHE_HOME/mla-edge."""
    env = os.environ.get("MLA_EDGE_CACHE")
    return Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mla-edge"


# Bumped when the exported graph changes but its contract does not (3: additive mask made once, RoPE in the
# projections; 4: the optional logits_to_keep input, the fp16 latent cache by default): the cached demo exports are
# keyed by it, so `mla-edge demo` and bench's default re-export.
EXPORT_REVISION = 4


def demo_export_dir() -> Path:
    """One folder per demo-weights version and manifest format (`mla-edge demo` writes it; generate and bench
    default to it)."""
    weights = DEMO_DIR / "model.safetensors"
    tag = hashlib.sha256(weights.read_bytes()).hexdigest()[:12] if weights.is_file() else "missing"
    return cache_root() / f"demo-{tag}-v{FORMAT_VERSION}.{EXPORT_REVISION}"
