"""Grouped weight codes in the folded MatMul layout: one blocked DequantizeLinear per weight.

A grouped plan weight (plan_weights: scale/zero [out, groups], `group_index` [in]) is exported
as B = codes [in, out] with rows in the graph's input order and columns in its output order,
and DequantizeLinear(axis=0, block_size=g) with scale/zero [in / g, out] (ONNX opset 21): block
k of g consecutive graph rows uses scale row k. That needs each group to be one such block in
the graph's order, which calibration guarantees (groups are cut after the reorder); a plan
whose groups are not contiguous there cannot be exported this way and is refused.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def grouped_weight_layout(
    codes_out_in: NDArray[np.integer],
    scale: NDArray[np.floating],
    zero: NDArray[np.integer],
    group_index: NDArray[np.integer],
    in_perm: NDArray[np.integer] | None,
    out_perm: NDArray[np.integer] | None,
) -> tuple[NDArray[np.integer], NDArray[np.floating], NDArray[np.integer], int]:
    """(codes [in, out], scale [G, out], zero [G, out], block size) in the graph's order.

    Raises ValueError when the groups are not equal, contiguous blocks in the graph's input
    order (or shapes disagree).
    """
    out_ch, in_ch = codes_out_in.shape
    groups = int(group_index.max(initial=-1)) + 1
    if scale.shape != (out_ch, groups) or zero.shape != scale.shape:
        raise ValueError(f"scale/zero {scale.shape} do not match [{out_ch}, {groups}]")
    if groups == 0 or in_ch % groups:
        raise ValueError(f"{in_ch} input channels do not split into {groups} equal groups")
    block = in_ch // groups
    rows = np.arange(in_ch) if in_perm is None else np.asarray(in_perm, np.int64)
    cols = np.arange(out_ch) if out_perm is None else np.asarray(out_perm, np.int64)
    if not np.array_equal(np.asarray(group_index)[rows], np.arange(in_ch) // block):
        raise ValueError("groups are not contiguous blocks in the graph's input order")
    codes = np.ascontiguousarray(codes_out_in.T[np.ix_(rows, cols)])
    return codes, np.ascontiguousarray(scale[cols].T), np.ascontiguousarray(zero[cols].T), block
