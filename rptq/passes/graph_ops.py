"""Graph building blocks every pass shares: lookups, rewiring, DequantizeLinear and INT4
packing builders, dtype helpers. No pass logic and no plan interpretation lives here.

Lookups turn "missing or different" into one-line GraphPatternErrors that name the node and
the pattern the pass expected; names come from rptq.names.

INT4 initializers: onnx-graphsurgeon 0.6.1 exports a Constant with `tensor.values.tobytes()`,
which for an ml_dtypes.int4 array is one byte per element while ONNX expects two per byte, so
export fails ("Raw data size does not match"). Constants whose values are a LazyValues wrapping
an onnx.TensorProto are exported verbatim, so INT4 codes are built with
onnx.numpy_helper.from_array (which packs them) and wrapped; `wrap_packed_constants` re-wraps
any INT4 array a later reader loaded (reading `Constant.values` replaces the wrapper).
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from numpy.typing import NDArray
from onnx import helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from rptq import names
from rptq.errors import GraphPatternError, PlanError
from rptq.plan import WeightQuant

PACKED_DTYPES = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))  # two per byte in ONNX
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
MATMUL_PATTERN = "MatMul(x, <module>.weight [in, out]) (docs/graph.md)"
LINEAR_PATTERN = "MatMul(x, <module>.weight [in, out]) -> Add(<module>.bias) (docs/graph.md)"


class GraphIndex:
    """Nodes and tensors of a graph by name, built once per pass (names are unique in ONNX)."""

    def __init__(self, graph: gs.Graph) -> None:
        self.graph = graph
        self.nodes: dict[str, gs.Node] = {n.name: n for n in graph.nodes if n.name}
        self.tensors: dict[str, gs.Tensor] = graph.tensors()

    def node(self, name: str, op: str, pattern: str) -> gs.Node:
        """The node called `name`, which must be an `op`."""
        found = self.nodes.get(name)
        if found is None:
            raise GraphPatternError(f"node {name} not found; expected {pattern}")
        if found.op != op:
            raise GraphPatternError(f"node {name} is a {found.op}, expected {op} in {pattern}")
        return found

    def constant_input(
        self, node: gs.Node, slot: int, name: str, ndim: int, pattern: str
    ) -> gs.Constant:
        """Input `slot` of `node`: an initializer called `name` of rank `ndim`, used only there.

        A single consumer is required because the passes replace the array: a shared initializer
        (a tied weight) would change another node's function too.
        """
        if len(node.inputs) <= slot:
            raise GraphPatternError(f"node {node.name} has no input {slot}; expected {pattern}")
        tensor = node.inputs[slot]
        if not isinstance(tensor, gs.Constant) or tensor.name != name:
            raise GraphPatternError(
                f"node {node.name} input {slot} is {tensor.name!r}, expected initializer {name} "
                f"in {pattern}"
            )
        if len(tensor.shape) != ndim:
            raise GraphPatternError(
                f"initializer {name} has shape {list(tensor.shape)}, expected rank {ndim} "
                f"in {pattern}"
            )
        if len(tensor.outputs) != 1:
            raise GraphPatternError(
                f"initializer {name} feeds {len(tensor.outputs)} nodes, expected only {node.name}"
            )
        return tensor


@dataclass(frozen=True)
class Linear:
    """A decoder linear as docs/graph.md builds it: MatMul(x, W [in, out]) -> Add(b)."""

    module: str
    matmul: gs.Node
    weight: gs.Constant
    add: gs.Node
    bias: gs.Constant


def find_linear(index: GraphIndex, module: str) -> Linear:
    """The MatMul -> Add of linear `module` with its weight and bias initializers (each read
    only by that node); GraphPatternError naming what differs otherwise."""
    matmul = index.node(names.node(module, "MatMul"), "MatMul", LINEAR_PATTERN)
    weight = index.constant_input(matmul, 1, names.weight(module), 2, LINEAR_PATTERN)
    add = index.node(names.node(module, "Add"), "Add", LINEAR_PATTERN)
    if len(add.inputs) != 2 or add.inputs[0] is not matmul.outputs[0]:
        raise GraphPatternError(
            f"node {add.name} does not add a bias to {matmul.name}'s output; expected "
            f"{LINEAR_PATTERN}"
        )
    bias = index.constant_input(add, 1, names.bias(module), 1, LINEAR_PATTERN)
    return Linear(module, matmul, weight, add, bias)


def weight_matmul(index: GraphIndex, quant: WeightQuant) -> tuple[gs.Node, gs.Constant]:
    """The MatMul of a plan weight and its [in, out] initializer, which must fit the codes."""
    matmul = index.node(names.node(quant.fqn, "MatMul"), "MatMul", MATMUL_PATTERN)
    weight = index.constant_input(matmul, 1, names.weight(quant.fqn), 2, MATMUL_PATTERN)
    out_ch, in_ch = quant.codes.shape
    if tuple(weight.shape) != (in_ch, out_ch):
        raise GraphPatternError(
            f"initializer {weight.name} has shape {list(weight.shape)}, but the plan's codes "
            f"need [{in_ch}, {out_ch}] (node {matmul.name})"
        )
    return matmul, weight


def rewire_consumers(consumers: list[gs.Node], source: gs.Tensor, target: gs.Tensor) -> None:
    """Make `consumers` read `target` wherever they read `source` (take the list before adding
    the nodes that read `source` themselves)."""
    for consumer in consumers:
        for slot, tensor in enumerate(consumer.inputs):
            if tensor is source:
                consumer.inputs[slot] = target


def onnx_type(dtype: np.dtype) -> int:
    """The ONNX TensorProto element type of a numpy dtype (a Cast's `to`)."""
    return int(helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))


def add_cast(
    graph: gs.Graph, source: gs.Variable, dtype: np.dtype, name: str, node_name: str
) -> gs.Variable:
    """Append `Cast(source) -> name` in `dtype` (same shape) and return the new tensor."""
    cast = gs.Variable(name, dtype=dtype, shape=source.shape)
    attrs = {"to": onnx_type(dtype)}
    graph.nodes.append(
        gs.Node("Cast", name=node_name, attrs=attrs, inputs=[source], outputs=[cast])
    )
    return cast


def packed_constant(name: str, array: NDArray[np.generic]) -> gs.Constant:
    """A Constant that exports correctly even for INT4 (see the module docstring)."""
    return gs.Constant(name, LazyValues(numpy_helper.from_array(np.ascontiguousarray(array), name)))


def add_dequantize(
    graph: gs.Graph,
    node: str,
    output: str,
    codes: tuple[str, NDArray[np.generic]],
    scale: tuple[str, NDArray[np.floating]],
    zero: tuple[str, NDArray[np.generic]],
    attrs: dict[str, int],
) -> gs.Variable:
    """Append `node` = DequantizeLinear of three (name, array) constants (INT4 packed); returns
    its float output `output`, shaped like the codes, in the scale's dtype."""
    out = gs.Variable(output, dtype=scale[1].dtype, shape=list(codes[1].shape))
    inputs = [
        packed_constant(*codes),
        gs.Constant(scale[0], np.ascontiguousarray(scale[1])),
        packed_constant(*zero),
    ]
    graph.nodes.append(
        gs.Node("DequantizeLinear", name=node, attrs=attrs, inputs=inputs, outputs=[out])
    )
    return out


def wrap_packed_constants(graph: gs.Graph) -> int:
    """Re-wrap INT4/UINT4 arrays as packed TensorProtos before gs export; returns how many."""
    wrapped = 0
    for tensor in graph.tensors().values():
        values = getattr(tensor, "_values", None)
        if isinstance(values, np.ndarray) and values.dtype in PACKED_DTYPES:
            tensor.values = packed_constant(tensor.name, values)._values
            wrapped += 1
    return wrapped


def packed_nbytes(dtype: np.dtype, size: int) -> int:
    """Bytes an ONNX initializer of `size` elements takes (INT4 packs two per byte)."""
    if np.dtype(dtype) in PACKED_DTYPES:
        return (size + 1) // 2
    return size * np.dtype(dtype).itemsize


def graph_float_dtype(graph: gs.Graph) -> np.dtype:
    """The export dtype, read from the graph's float output.

    A whole rptq graph has `logits`; a streamed fragment (rptq.exporter.stream) has one decoder
    layer's output instead, and the passes must read the same dtype from either.
    """
    for out in graph.outputs:
        if out.dtype is not None and np.dtype(out.dtype) in _FLOAT_DTYPES:
            return np.dtype(out.dtype)
    raise GraphPatternError(
        f"graph output {names.GRAPH_LOGITS} with dtype float32 or float16 not found; "
        "expected an rptq FP graph (docs/graph.md)"
    )


def float_dtype(tensor: gs.Tensor, where: str) -> np.dtype:
    """The graph's float dtype, read from a float initializer (float32 or float16)."""
    dtype = np.dtype(tensor.dtype)
    if dtype not in _FLOAT_DTYPES:
        raise GraphPatternError(f"{where}: {tensor.name} is {dtype}, expected float32 or float16")
    return dtype


def as_dtype(values: NDArray[np.number], dtype: np.dtype, what: str) -> NDArray[np.floating]:
    """Cast a folded float array to the graph dtype; a value that overflows is a PlanError."""
    cast = np.asarray(values, np.float64).astype(dtype, order="C")  # keeps a scalar 0-D
    if not np.all(np.isfinite(cast)):
        raise PlanError(f"{what}: a folded value is not representable in {dtype}; recalibrate")
    return cast


@dataclass(frozen=True, slots=True)
class RowTermNames:
    """The names of one `y ± ReduceSum(x) ⊗ row` term (from names.py, per caller's role)."""

    reduce_node: str
    axes: str
    reduced: str
    mul_node: str
    row: str
    product: str
    combine_node: str
    output: str


def add_row_term(
    graph: gs.Graph,
    x: gs.Tensor,
    y: gs.Tensor,
    row: NDArray[np.floating],
    n: RowTermNames,
    combine: str,
) -> gs.Variable:
    """`y + ReduceSum(x) ⊗ row` (combine "Add") or `y − …` ("Sub"), a per-token rank-1 term.

    x·(1 rowᵀ) is the share of x·W of a weight part that is constant along the input dim (a
    GPTQT offset β, the zero points of a symmetric-stored weight): one reduction per token
    instead of a full float GEMM, which keeps the weight itself on an integer kernel.
    """
    dtype = row.dtype
    reduced = gs.Variable(n.reduced, dtype=dtype)
    product = gs.Variable(n.product, dtype=dtype)
    output = gs.Variable(n.output, dtype=dtype)
    axes = gs.Constant(n.axes, np.array([-1], np.int64))
    graph.nodes += [
        gs.Node(
            "ReduceSum",
            name=n.reduce_node,
            attrs={"keepdims": 1},
            inputs=[x, axes],
            outputs=[reduced],
        ),
        gs.Node(
            "Mul", name=n.mul_node, inputs=[reduced, gs.Constant(n.row, row)], outputs=[product]
        ),
        gs.Node(combine, name=n.combine_node, inputs=[y, product], outputs=[output]),
    ]
    return output
