"""mla_edge.runtime: torch-free cached generation with onnxruntime."""
