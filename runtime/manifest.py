"""The export folder's manifest, `mla_edge.json`: the one contract between the exporter and every runtime.

The runtime and the Android demo read nothing else (no torch, no config.json). Torch-free.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "mla_edge.json"
FORMAT = "mla-edge-export"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "int8", "int4", "int8-qdq")
MODEL_FILE = {"fp32": "model.onnx", "int8": "model.int8.onnx", "int4": "model.int4.onnx", "int8-qdq": "model.int8-qdq.onnx"}
GRAPH_INPUTS = ("input_ids", "attention_mask", "position_ids")  # then the cache contract's past names
GRAPH_OUTPUTS = ("logits",)  # then the cache contract's present names


def ort_name(precision: str) -> str:
    """The ORT-format companion of a precision's .onnx file."""
    return MODEL_FILE[precision][: -len(".onnx")] + ".ort"


class ManifestError(ValueError):
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


@dataclass(frozen=True)
class Manifest:
    data: dict
    folder: Path

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{folder} is not an mla-edge export folder: {MANIFEST} is missing (run `mla-edge export` first)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"{path} is not valid JSON: {e}") from None
        if data.get("format") != FORMAT:
            raise ManifestError(f"{path}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"{path}: format_version {data.get('format_version')!r} is not supported (this runtime reads {FORMAT_VERSION})")
        for key in ("model", "cache", "graph", "files", "tokens"):
            if key not in data:
                raise ManifestError(f"{path}: field {key!r} is missing")
        return cls(data, folder)

    @property
    def precisions(self) -> list[str]:
        return list(self.data["files"])

    def ort_format_usable(self, precision: str) -> bool:
        """An ORT-format file exists for this precision and was optimized on this kind of machine."""
        import platform
        ort = self.data["files"].get(precision, {}).get("ort")
        return bool(ort) and ort.get("platform") == platform.machine()

    def model_path(self, precision: str, verify: bool = True, ort_format: bool = False) -> Path:
        """Path of one precision's model file (or its ORT-format companion); with verify, the sha256 of every file
        of that precision (the .onnx, any external data, the .ort) is checked first."""
        if precision not in self.data["files"]:
            raise ManifestError(f"precision {precision!r} is not in this export (has: {', '.join(self.precisions)})")
        entry = self.data["files"][precision]
        files = entry["files"] + ([entry["ort"]] if entry.get("ort") else [])  # a tampered export is refused whole
        if ort_format:
            entry = {"path": entry["ort"]["path"]}
        for f in files:
            p = self.folder / f["path"]
            if not p.is_file():
                raise ManifestError(f"model file {p} listed in {MANIFEST} is missing")
            if verify and sha256(p) != f["sha256"]:
                raise ManifestError(f"model file {p.name} does not match its sha256 in {MANIFEST}: it was changed or corrupted")
        return self.folder / entry["path"]

    @property
    def past_names(self) -> list[str]:
        return [p["name"] for p in self.data["cache"]["past"]]

    @property
    def present_names(self) -> list[str]:
        return [p["name"] for p in self.data["cache"]["present"]]

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.data.get("tokenizer")
        return self.folder / name if name else None
