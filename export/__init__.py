"""mla_edge.export: PyTorch -> ONNX with explicit latent-cache inputs/outputs, and quantization."""
