"""Converts: PyTorch -> ONNX graphs, quantization, the export folder, and parity against PyTorch (needs `[export]`)."""
