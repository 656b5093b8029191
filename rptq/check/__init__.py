"""Read-only checks of exported graphs against a runtime's rules (TensorRT's Q/DQ and op rules).

Kept apart from `rptq.passes`: the checker reads graphs (an ONNX file loaded without its
external data), it never transforms them, and it must judge any graph, not only rptq's.
"""
