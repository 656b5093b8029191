"""Backends: the PyTorch reference, ONNX Runtime, TensorRT, and perplexity."""
