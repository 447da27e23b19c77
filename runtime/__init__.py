"""Runs, torch-free: the manifest, onnxruntime sessions, generation, the benchmark and memory budgets."""
