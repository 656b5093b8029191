"""rptq: reorder-based post-training quantization (RPTQ) of OPT models, exported to ONNX."""

__version__ = "0.1.0"
