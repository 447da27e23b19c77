"""mla-edge: Multi-Head Latent Attention models on the edge, with MLA's small latent cache kept end to end.

Layout: `contract` (the one torch-free contract: cache, graph protocols, precisions, manifest schema) and `cli` sit
at the top; `models` defines, `export` converts (needs the `[export]` extra), `runtime` runs without torch.

The public API (names load on first use, so `import mla_edge` never imports torch):
    MLAConfig, CacheContract                    architecture config, cache contract (torch-free)
    Generator, SamplingOptions, Manifest        cached generation over an export folder (torch-free)
    load_model, ModelOptions, MLAForCausalLM    the PyTorch decoder (torch)
    export_folder, ExportOptions                export + quantize (torch, onnx)
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

# numpy's OpenBLAS starts a thread per core at import, and they spin for a while: on a 2-core laptop they take the
# CPU from onnxruntime just as the model loads (measured: the demo int8 session loads in 44 ms right after import,
# 27 ms with this). The runtime does no BLAS work in numpy, so the package (the library as well as the CLI) keeps
# OpenBLAS to one thread unless asked; it takes effect where mla_edge is imported before numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.2.0"
__all__ = [
    "__version__",
    "MLAConfig",
    "CacheContract",
    "Generator",
    "SamplingOptions",
    "Manifest",
    "load_model",
    "ModelOptions",
    "MLAForCausalLM",
    "export_folder",
    "ExportOptions",
]

if TYPE_CHECKING:
    from mla_edge.contract import CacheContract
    from mla_edge.export.pipeline import ExportOptions, export_folder
    from mla_edge.models.checkpoint import load_model
    from mla_edge.models.config import MLAConfig
    from mla_edge.models.mla import MLAForCausalLM, ModelOptions
    from mla_edge.runtime.generate import Generator
    from mla_edge.runtime.manifest import Manifest
    from mla_edge.runtime.sampling import SamplingOptions


def __getattr__(name: str) -> Any:
    module: ModuleType
    if name == "CacheContract":
        from mla_edge import contract as module
    elif name == "MLAConfig":
        from mla_edge.models import config as module
    elif name in ("Generator", "SamplingOptions", "Manifest"):
        from mla_edge.runtime import generate, manifest, sampling

        module = {"Generator": generate, "SamplingOptions": sampling, "Manifest": manifest}[name]
    elif name in ("load_model", "ModelOptions", "MLAForCausalLM"):
        from mla_edge.models import checkpoint as module
    elif name in ("export_folder", "ExportOptions"):
        from mla_edge.export import pipeline as module
    else:
        raise AttributeError(f"module 'mla_edge' has no attribute {name!r}")
    return getattr(module, name)
