"""The TensorRT variant's passes (docs/tensorrt-rules.md, "Implementation").

`acts` holds what the passes share (which activation folds where, its parameters in graph
order), `fold` folds every cluster's scale and zero point into producers and consumers (and
quantizes the linears' weights through `linears`), `qdq` inserts the per-tensor INT8 Q/DQ.
One target, one folder: ONNX Runtime's passes stay in `rptq.passes`.
"""
