"""Write an ONNX model atomically, with its weights in one external data file when needed.

Protobuf cannot serialize a message over 2 GiB, so OPT-1.3B and larger in fp32 (and 6.7B in any
dtype) must keep initializers in an external file. `onnx.save_model(save_as_external_data=True)`
rewrites the caller's model in place, leaving it pointing at a file in our temporary directory;
this writer instead streams each initializer's bytes to the data file and serializes a stripped
copy of the graph, so the caller's model is untouched and peak memory grows by one tensor.

Everything is written into a temporary directory beside the destination; the data file is
renamed into place first and the model last, so a model file never names data that is absent,
and an interrupted save (including Ctrl-C) leaves nothing at the final paths.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import Message
from onnx import TensorProto, helper

from rptq.errors import OutputError
from rptq.io import check_output

# Protobuf's hard limit is 2 GiB; leave headroom for nodes, names and metadata.
PROTOBUF_LIMIT_BYTES = 2**31 - 64 * 2**20
# Initializers smaller than this stay inline (shape constants, scalars), as onnx does.
EXTERNAL_MIN_BYTES = 1024
# Offsets are aligned so runtimes can mmap each tensor.
ALIGNMENT_BYTES = 4096


def data_path(path: Path) -> Path:
    """The external data file of model `path`: `<file name>.data` beside it."""
    return path.with_name(f"{path.name}.data")


def _tensor_bytes(tensor: TensorProto) -> int:
    """Size of an initializer's payload from its dims and dtype, without copying it."""
    itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return math.prod(tensor.dims) * itemsize


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Total payload of the top-level initializers (what decides external data)."""
    return sum(_tensor_bytes(t) for t in model.graph.initializer)


def _is_external(tensor: TensorProto) -> bool:
    return tensor.data_location == TensorProto.EXTERNAL


def copy_fields(source: Message, target: Message, skip: tuple[str, ...] = ()) -> None:
    """Copy every set field of `source` into `target` except the fields named in `skip`."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        # protobuf 6+ deprecates `label` in favour of `is_repeated`
        repeated = getattr(field, "is_repeated", None)
        if repeated is None:
            repeated = field.label == field.LABEL_REPEATED
        if repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _externalize(tensor: TensorProto, handle: BinaryIO, location: str) -> TensorProto:
    """Append `tensor`'s payload to `handle` (aligned); return a reference without payload."""
    offset = handle.tell()
    padding = -offset % ALIGNMENT_BYTES
    handle.write(b"\0" * padding)
    offset += padding
    payload = tensor.raw_data  # one tensor's bytes at a time
    handle.write(payload)
    reference = TensorProto()
    reference.name = tensor.name
    reference.data_type = tensor.data_type
    reference.dims.extend(tensor.dims)
    if tensor.doc_string:
        reference.doc_string = tensor.doc_string
    reference.data_location = TensorProto.EXTERNAL
    for key, entry in (("location", location), ("offset", offset), ("length", len(payload))):
        item = reference.external_data.add()
        item.key, item.value = key, str(entry)
    return reference


def _inline(reference: TensorProto, handle: BinaryIO) -> TensorProto:
    """The tensor `_externalize` stood in for, read back from `handle` (inverse of it)."""
    where = {
        item.key: int(item.value) for item in reference.external_data if item.key != "location"
    }
    tensor = TensorProto()
    tensor.CopyFrom(reference)
    tensor.ClearField("data_location")
    tensor.ClearField("external_data")
    handle.seek(where["offset"])
    tensor.raw_data = handle.read(where["length"])
    return tensor


def _goes_external(tensor: TensorProto) -> bool:
    return tensor.HasField("raw_data") and _tensor_bytes(tensor) >= EXTERNAL_MIN_BYTES


class OnnxWriter:
    """Writes a model whose graph arrives in pieces, without ever holding all its weights.

    `add` takes nodes, initializers and value_info in final order and streams every large
    initializer to the data file at once (the caller can drop the piece afterwards); `finish`
    writes the model around them from `header` (opset, metadata, graph name, inputs, outputs)
    and renames everything into place. Files go to a temporary directory beside `path` first,
    the data file is renamed before the model, and `abort` (or an exception inside the `with`
    block) leaves nothing at the final paths.

    `external_data`: True/False forces the layout; None decides at `finish` from the total
    initializer bytes, as `save_onnx` does (a small model is read back and stored inline).
    """

    def __init__(self, path: Path, force: bool = False, external_data: bool | None = None) -> None:
        self.path = Path(path)
        self.external_data = external_data
        self.data_file = data_path(self.path)
        check_output(self.path, force)
        if external_data is not False:
            check_output(self.data_file, force)
        self._tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        )
        self._handle: BinaryIO | None = None
        if external_data is not False:
            self._handle = open(self._tmp / self.data_file.name, "w+b")  # noqa: SIM115
        self._graph = onnx.GraphProto()
        self.initializer_bytes = 0

    @property
    def bytes_written(self) -> int:
        """Bytes in the data file so far (for progress)."""
        return self._handle.tell() if self._handle is not None else 0

    def add(
        self,
        nodes: Iterable[onnx.NodeProto],
        initializers: Iterable[TensorProto],
        value_info: Iterable[onnx.ValueInfoProto] = (),
    ) -> None:
        """Append one piece of the graph (copies nodes and small tensors, streams large ones)."""
        graph = self._graph
        graph.node.extend(nodes)
        try:
            for tensor in initializers:
                self.initializer_bytes += _tensor_bytes(tensor)
                if self._handle is not None and _goes_external(tensor):
                    graph.initializer.append(
                        _externalize(tensor, self._handle, self.data_file.name)
                    )
                else:
                    graph.initializer.append(tensor)
        except OSError as exc:
            raise self._error(exc) from exc
        graph.value_info.extend(value_info)

    def finish(self, header: onnx.ModelProto, doc_string: str = "") -> list[Path]:
        """Write the model and move the files into place; returns them, data file first."""
        model = onnx.ModelProto()
        copy_fields(header, model, skip=("graph",))
        copy_fields(header.graph, model.graph, skip=("node", "initializer", "value_info"))
        graph = model.graph
        graph.node.extend(self._graph.node)
        graph.value_info.extend(self._graph.value_info)
        if doc_string:
            graph.doc_string = doc_string
        external = self.external_data
        if external is None:
            external = self.initializer_bytes > PROTOBUF_LIMIT_BYTES
        graph.initializer.extend(self._graph.initializer)  # payloads stay in the data file
        try:
            finals = [self.data_file, self.path] if external else [self.path]
            inline_from = None if external else self._handle
            _write_model(model, self._tmp / self.path.name, inline_from)
            del model
            if self._handle is not None:
                self._handle.close()
                if not external:
                    (self._tmp / self.data_file.name).unlink()
            moved: list[Path] = []
            try:
                for final in finals:
                    os.replace(self._tmp / final.name, final)
                    moved.append(final)
            except BaseException:
                # a data file without its model is no output: take back what was moved
                for final in moved:
                    with contextlib.suppress(FileNotFoundError):
                        final.unlink()
                raise
        except OSError as exc:
            raise self._error(exc) from exc
        finally:
            self.abort()
        return finals

    def abort(self) -> None:
        """Remove the temporary files (after `finish` only the empty directory is left)."""
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _error(self, exc: OSError) -> OutputError:
        return OutputError(
            f"could not write {self.path} ({exc.strerror or exc}); check free space and permissions"
        )

    def __enter__(self) -> OnnxWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


def _write_model(model: onnx.ModelProto, path: Path, inline_from: BinaryIO | None = None) -> None:
    """Serialize `model` to `path`; with `inline_from`, its external initializers are read from
    that spooled data file and written inline, one tensor at a time (`_write_inlined`)."""
    with open(path, "wb") as handle:
        if inline_from is None:
            handle.write(model.SerializeToString())
        else:
            _write_inlined(model, handle, inline_from)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_prefix(field: int, length: int) -> bytes:
    """Key and length of a length-delimited protobuf field."""
    return _varint(field << 3 | 2) + _varint(length)


def _fields_bytes(message: Message, keep: Callable[[int], bool]) -> bytes:
    """Serialization of the set fields of `message` whose field number passes `keep`."""
    subset = type(message)()
    skip = tuple(field.name for field, _ in message.ListFields() if not keep(field.number))
    copy_fields(message, subset, skip=skip)
    return subset.SerializeToString()


_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA = TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _inline_size(tensor: TensorProto) -> int:
    """Serialized size of `tensor` once inlined, without reading its payload."""
    if not _is_external(tensor):
        return tensor.ByteSize()
    bare = TensorProto()
    bare.CopyFrom(tensor)
    bare.ClearField("data_location")
    bare.ClearField("external_data")
    length = next(int(item.value) for item in tensor.external_data if item.key == "length")
    return bare.ByteSize() + len(_length_prefix(_RAW_DATA, length)) + length


def _write_inlined(model: onnx.ModelProto, handle: BinaryIO, spool: BinaryIO) -> None:
    """Write the bytes `model.SerializeToString()` would give with every external initializer
    inlined, holding one tensor at a time.

    Protobuf writes fields in field-number order, so the model is: its fields before `graph`,
    the graph's key and length, the graph's fields before `initializer`, each initializer,
    the graph's remaining fields, the model's remaining fields. Lengths are computed up front
    from the references (`_inline_size`); each tensor's size is checked as it is written.
    """
    graph = model.graph
    graph_head = _fields_bytes(graph, lambda n: n < _INITIALIZER)
    graph_tail = _fields_bytes(graph, lambda n: n > _INITIALIZER)
    sizes = [_inline_size(tensor) for tensor in graph.initializer]
    graph_length = len(graph_head) + len(graph_tail)
    graph_length += sum(len(_length_prefix(_INITIALIZER, size)) + size for size in sizes)
    handle.write(_fields_bytes(model, lambda n: n < _GRAPH))
    handle.write(_length_prefix(_GRAPH, graph_length))
    handle.write(graph_head)
    for tensor, size in zip(graph.initializer, sizes, strict=True):
        payload = (_inline(tensor, spool) if _is_external(tensor) else tensor).SerializeToString()
        if len(payload) != size:
            raise AssertionError(
                f"initializer {tensor.name}: {len(payload)} bytes, expected {size}"
            )
        handle.write(_length_prefix(_INITIALIZER, size))
        handle.write(payload)
        del payload
    handle.write(graph_tail)
    handle.write(_fields_bytes(model, lambda n: n > _GRAPH))


def save_onnx(
    model: onnx.ModelProto,
    path: Path,
    force: bool = False,
    external_data: bool | None = None,
) -> list[Path]:
    """Save `model` to `path` (and `<path>.data`); returns the written files, data first.

    `external_data=None` chooses automatically: external when the initializers alone would
    approach protobuf's 2 GiB limit. Raises OutputError when an output exists without `force`,
    the directory is missing or unwritable, or the model still references unloaded external data.
    The caller's model is not changed.
    """
    path = Path(path)
    if any(_is_external(t) for t in model.graph.initializer):
        raise OutputError(
            f"cannot save to {path}: the model references external data that is not loaded; "
            "load it with onnx.load(..., load_external_data=True) first"
        )
    if external_data is None:
        external_data = initializer_bytes(model) > PROTOBUF_LIMIT_BYTES
    with OnnxWriter(path, force, external_data) as writer:
        graph = model.graph
        writer.add(graph.node, graph.initializer, graph.value_info)
        return writer.finish(model, graph.doc_string)
