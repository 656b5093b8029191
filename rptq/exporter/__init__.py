"""Weights -> raw FP ONNX graph (docs/graph.md), and atomic saving with external data."""

from rptq.exporter.opt import build_fp_graph
from rptq.exporter.save import save_onnx

__all__ = ["build_fp_graph", "save_onnx"]
