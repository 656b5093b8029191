"""A read-only index of an ONNX graph for the TensorRT rule checker (rptq/check/rules.py).

TensorRT's rules talk about producers ("rooted at a constant"), build-time constants, element
types and scale ranks, so the checker needs producer links, types and a few constant values.
The model is usually loaded without external data: types come from the initializers' headers
and shape inference on a copy without large payloads, and values are read only for scales and
zero points (small tensors), one at a time from the external data file when needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, external_data_helper, helper, numpy_helper

# Ops that keep a tensor a build-time constant when all their inputs are constants (TensorRT
# folds them): casts and shape changes, and Q/DQ of a weight (ModelOpt's weight Q/DQ pairs).
FOLDABLE_OPS = {
    "Identity",
    "Cast",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Flatten",
    "Transpose",
    "QuantizeLinear",
    "DequantizeLinear",
}
# Ops whose first input passes its values through unchanged up to dtype and shape.
VALUE_PRESERVING_OPS = {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}
INLINE_PAYLOAD_BYTES = 4096  # initializers kept in the type-inference copy (shape tensors)
FLOAT_TYPES = {
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
    TensorProto.DOUBLE,
}

Shape = tuple[int | str | None, ...]


def _payload_bytes(tensor: TensorProto) -> int:
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * itemsize


def _type_info(value: onnx.ValueInfoProto) -> tuple[int, Shape | None] | None:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        return None
    tensor_type = value.type.tensor_type
    shape: Shape | None = None
    if tensor_type.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        )
    return tensor_type.elem_type, shape


def _inferred_types(model: onnx.ModelProto) -> dict[str, tuple[int, Shape | None]]:
    """Types and shapes from ONNX shape inference on a copy holding no large payloads.

    Large initializers become graph inputs of the same type and shape, so inference needs no
    weights and the copy stays small even for a model loaded with all its data.
    """
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {v.name for v in model.graph.input}
    for tensor in model.graph.initializer:
        small = _payload_bytes(tensor) <= INLINE_PAYLOAD_BYTES
        if small and not external_data_helper.uses_external_data(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return {}
    found: dict[str, tuple[int, Shape | None]] = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        info = _type_info(value)
        if info is not None:
            found[value.name] = info
    return found


def load_values(tensor: TensorProto, base_dir: Path | None) -> NDArray[np.float64] | None:
    """Values of one tensor as float64, reading its external data if needed (None if absent)."""
    if external_data_helper.uses_external_data(tensor):
        if base_dir is None:
            return None
        loaded = TensorProto()
        loaded.CopyFrom(tensor)
        external_data_helper.load_external_data_for_tensor(loaded, str(base_dir))
        tensor = loaded
    return np.asarray(numpy_helper.to_array(tensor)).astype(np.float64)


class ModelView:
    """Producers, constants, types and (lazily) constant values of the main graph."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None) -> None:
        """Index `model`; `base_dir` is where its external data files are."""
        self.model = model
        self.base_dir = base_dir
        self.nodes = list(model.graph.node)
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.constants: dict[str, TensorProto] = dict(self.initializers)
        for node in self.nodes:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self.constants[node.output[0]] = attr.t
        self.types = _inferred_types(model)
        for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
            info = _type_info(value)
            if info is not None:
                self.types.setdefault(value.name, info)
        for name, tensor in self.constants.items():
            self.types[name] = (tensor.data_type, tuple(tensor.dims))
        self._constant: dict[str, bool] = {}

    @property
    def opset(self) -> int | None:
        """The default-domain opset the model imports (None if it imports none)."""
        for entry in self.model.opset_import:
            if entry.domain in ("", "ai.onnx"):
                return int(entry.version)
        return None

    def qdq_nodes(self) -> list[onnx.NodeProto]:
        """Every QuantizeLinear and DequantizeLinear node, in graph order."""
        return [
            n
            for n in self.nodes
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx")
        ]

    @staticmethod
    def input(node: onnx.NodeProto, slot: int) -> str:
        """Name of input `slot`, or "" when the optional input is absent."""
        return node.input[slot] if len(node.input) > slot else ""

    @staticmethod
    def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
        """Integer attribute `name` of `node`, or `default` when it is not set."""
        for attr in node.attribute:
            if attr.name == name:
                return int(attr.i)
        return default

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of tensor `name`, if the graph declares it."""
        info = self.types.get(name)
        return info[0] if info else None

    def rank(self, name: str) -> int | None:
        """Rank of tensor `name`, if the graph declares its shape."""
        info = self.types.get(name)
        return None if info is None or info[1] is None else len(info[1])

    def is_constant(self, name: str) -> bool:
        """True for an initializer, a Constant, or a foldable op of constants (memoised)."""
        if not name:
            return False
        if name in self._constant:
            return self._constant[name]
        self._constant[name] = False  # cycles cannot occur in a valid graph; guard anyway
        result = name in self.constants
        producer = self.producer.get(name)
        if not result and producer is not None and producer.op_type in FOLDABLE_OPS:
            result = all(self.is_constant(i) for i in producer.input if i)
        self._constant[name] = result
        return result

    def values(self, name: str) -> NDArray[np.float64] | None:
        """Float64 values of a constant, following value-preserving ops back to its root."""
        seen = 0
        while name not in self.constants:
            producer = self.producer.get(name)
            if producer is None or producer.op_type not in VALUE_PRESERVING_OPS or seen > 16:
                return None
            name, seen = producer.input[0], seen + 1
        return load_values(self.constants[name], self.base_dir)

    def quantized_type(self, node: onnx.NodeProto) -> int | None:
        """The integer/float8 type a Q produces or a DQ consumes."""
        zero = self.input(node, 2)
        if zero and self.elem_type(zero) is not None:
            return self.elem_type(zero)
        if node.op_type == "QuantizeLinear":
            # ONNX: without a zero point the type is output_dtype, whose default is UINT8
            return self.attr_int(node, "output_dtype", 0) or TensorProto.UINT8
        data = node.input[0]
        if self.elem_type(data) is not None:
            return self.elem_type(data)
        producer = self.producer.get(data)
        if producer is not None and producer.op_type == "QuantizeLinear":
            return self.quantized_type(producer)
        return None

    def float_types(self) -> set[int]:
        """Float element types of the initializers and typed tensors (the compute dtypes)."""
        found = {t.data_type for t in self.model.graph.initializer}
        found |= {info[0] for info in self.types.values()}
        return found & FLOAT_TYPES
