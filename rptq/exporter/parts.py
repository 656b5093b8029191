"""One canonical layout for every exported graph, whether built whole or streamed layer by layer.

An ONNX file's bytes depend on the order of its nodes, initializers and value_info, which
onnx-graphsurgeon's toposort derives from the whole graph (a weight's DequantizeLinear has no
graph input, so it sorts before every layer). The streamed export only ever sees one decoder
layer, so both exports use this layout instead:

- parts in graph order: the prologue (embeddings, mask), decoder layers 0..N-1, the head
  (final LayerNorm, LM head); a node belongs to the part its name says (docs/naming.md);
- nodes of a part in topological order, ties broken by node name;
- initializers in order of first use, value_info in order of the producing node;
- value_info only for tensors made and used inside one part (the cut points between parts are
  fragment inputs and outputs in the streamed export, so neither layout describes them);
- the passes' records in the graph doc_string (`prefix:key=value ...`) merged per prefix.

Streamed and whole exports of the same model and plan are then byte-identical (tested).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from rptq import names

PROLOGUE = "prologue"
HEAD = "head"
_HEAD_MODULES = (names.FINAL_LAYER_NORM, names.LM_HEAD)


@dataclass
class Part:
    """Nodes, initializers and value_info of one part, in canonical order."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[Any] = field(default_factory=list)  # what `layout_part` was given
    value_info: list[onnx.ValueInfoProto] = field(default_factory=list)


def _module_of(node_name: str) -> str:
    return node_name.split("/", 1)[0]


def part_key(node_name: str, num_layers: int) -> int:
    """0 for the prologue, 1 + L for decoder layer L, num_layers + 1 for the head."""
    module = _module_of(node_name)
    if any(module == head or module.startswith(f"{head}.") for head in _HEAD_MODULES):
        return num_layers + 1
    if module.startswith(names.LAYER_PREFIX):
        index = module[len(names.LAYER_PREFIX) :].split(".", 1)[0]
        if index.isdigit() and int(index) < num_layers:
            return 1 + int(index)
    return 0


def topological_nodes(nodes: Sequence[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Kahn's algorithm over the part's own edges; among ready nodes the smallest name first.

    Inputs made outside `nodes` (graph inputs, initializers, earlier parts) count as ready, so
    the order depends only on the part's nodes, never on how the graph around them was built.
    """
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [0] * len(nodes)
    users: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        sources = {producer[name] for name in node.input if name in producer}
        sources.discard(i)
        waiting[i] = len(sources)
        for source in sources:
            users[source].append(i)
    ready = [(node.name, i) for i, node in enumerate(nodes) if waiting[i] == 0]
    heapq.heapify(ready)
    ordered: list[onnx.NodeProto] = []
    while ready:
        _, i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for user in users[i]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (nodes[user].name, user))
    if len(ordered) != len(nodes):
        raise AssertionError("graph part has a cycle; the exporter or a pass built a bad graph")
    return ordered


def layout_part(
    nodes: Sequence[onnx.NodeProto],
    initializers: Mapping[str, Any],
    value_info: Iterable[onnx.ValueInfoProto],
    external_uses: frozenset[str] | set[str] = frozenset(),
    placed: set[str] | None = None,
) -> Part:
    """One part in canonical order.

    `external_uses`: tensors that nodes outside this part (or the graph outputs) read; their
    value_info is dropped. `placed`: initializers an earlier part already holds (the tied LM
    head reads the prologue's token embedding); updated with this part's. Initializers no node
    of the part reads are dropped (a cleaned graph has none). `initializers` maps names to
    TensorProtos, or to anything the caller turns into one later (the streamed export passes
    onnx-graphsurgeon constants and converts them one at a time).
    """
    placed = set() if placed is None else placed
    ordered = topological_nodes(nodes)
    by_name = initializers
    infos = {info.name: info for info in value_info}
    part = Part(nodes=ordered)
    for node in ordered:
        for name in node.input:
            if name in by_name and name not in placed:
                placed.add(name)
                part.initializers.append(by_name[name])
    for node in ordered:
        for name in node.output:
            if name in infos and name not in external_uses:
                part.value_info.append(infos[name])
    return part


def merge_records(doc_strings: Iterable[str]) -> str:
    """Join `prefix:entries` lines of several graphs' doc_strings, one line per prefix."""
    merged: dict[str, list[str]] = {}
    for doc in doc_strings:
        for line in doc.splitlines():
            prefix, sep, entries = line.partition(":")
            key = prefix + sep
            merged.setdefault(key, [])
            if entries:
                merged[key].append(entries)
    return "\n".join(key + " ".join(entries) for key, entries in merged.items())


def split_parts(graph: onnx.GraphProto, num_layers: int) -> list[Part]:
    """The whole graph's nodes, initializers and value_info as canonical parts."""
    grouped: list[list[onnx.NodeProto]] = [[] for _ in range(num_layers + 2)]
    for node in graph.node:
        grouped[part_key(node.name, num_layers)].append(node)
    part_of_node = {node.name: key for key, nodes in enumerate(grouped) for node in nodes}
    made_in = {out: part_of_node[n.name] for n in graph.node for out in n.output if out}
    crossing = {out.name for out in graph.output}
    for node in graph.node:
        for name in node.input:
            if name in made_in and made_in[name] != part_of_node[node.name]:
                crossing.add(name)
    placed: set[str] = set()
    by_name = {tensor.name: tensor for tensor in graph.initializer}
    return [layout_part(nodes, by_name, graph.value_info, crossing, placed) for nodes in grouped]


def canonical_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` (a whole rptq graph) with its graph in canonical layout; a copy."""
    from rptq.exporter.opt import META_NUM_LAYERS
    from rptq.exporter.save import copy_fields

    meta = {prop.key: prop.value for prop in model.metadata_props}
    parts = split_parts(model.graph, int(meta[META_NUM_LAYERS]))
    out = onnx.ModelProto()
    copy_fields(model, out, skip=("graph",))
    graph = out.graph
    copy_fields(model.graph, graph, skip=("node", "initializer", "value_info", "doc_string"))
    for part in parts:
        graph.node.extend(part.nodes)
        graph.initializer.extend(part.initializers)
        graph.value_info.extend(part.value_info)
    if model.graph.doc_string:
        graph.doc_string = merge_records([model.graph.doc_string])
    return out
