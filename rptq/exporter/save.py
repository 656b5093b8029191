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


def _copy_fields(source: Message, target: Message, skip: str) -> None:
    """Copy every set field of `source` into `target` except field `skip`."""
    for field, value in source.ListFields():
        if field.name == skip:
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


def _write_external_data(
    model: onnx.ModelProto, handle: BinaryIO, location: str
) -> onnx.ModelProto:
    """Stream large initializers to `handle`; return the model with references instead.

    The returned model shares nothing with `model`: graph fields are copied one by one with the
    initializers rebuilt without payload, so the caller's tensors are never cleared.
    """
    stripped = onnx.ModelProto()
    _copy_fields(model, stripped, skip="graph")
    _copy_fields(model.graph, stripped.graph, skip="initializer")
    graph = stripped.graph

    for tensor in model.graph.initializer:
        if not tensor.HasField("raw_data") or _tensor_bytes(tensor) < EXTERNAL_MIN_BYTES:
            graph.initializer.append(tensor)  # copies; small
            continue
        offset = handle.tell()
        padding = -offset % ALIGNMENT_BYTES
        handle.write(b"\0" * padding)
        offset += padding
        payload = tensor.raw_data  # one tensor's bytes at a time
        handle.write(payload)
        reference = graph.initializer.add()
        reference.name = tensor.name
        reference.data_type = tensor.data_type
        reference.dims.extend(tensor.dims)
        if tensor.doc_string:
            reference.doc_string = tensor.doc_string
        reference.data_location = TensorProto.EXTERNAL
        for key, entry in (("location", location), ("offset", offset), ("length", len(payload))):
            item = reference.external_data.add()
            item.key, item.value = key, str(entry)
        del payload
    return stripped


def _write_model(model: onnx.ModelProto, path: Path) -> None:
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())


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
    """
    path = Path(path)
    if any(_is_external(t) for t in model.graph.initializer):
        raise OutputError(
            f"cannot save to {path}: the model references external data that is not loaded; "
            "load it with onnx.load(..., load_external_data=True) first"
        )
    if external_data is None:
        external_data = initializer_bytes(model) > PROTOBUF_LIMIT_BYTES
    finals = [data_path(path), path] if external_data else [path]
    for final in finals:
        check_output(final, force)

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    moved: list[Path] = []
    try:
        try:
            staged = [tmp / final.name for final in finals]
            if external_data:
                with open(staged[0], "wb") as handle:
                    stripped = _write_external_data(model, handle, finals[0].name)
                _write_model(stripped, staged[1])
            else:
                _write_model(model, staged[0])
            for source, final in zip(staged, finals, strict=True):
                os.replace(source, final)
                moved.append(final)
        except OSError as exc:
            raise OutputError(
                f"could not write {path} ({exc.strerror or exc}); check free space and permissions"
            ) from exc
    except BaseException:
        # a data file without its model is no output: take back what was already moved
        if len(moved) < len(finals):
            for final in moved:
                with contextlib.suppress(FileNotFoundError):
                    final.unlink()
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return finals
