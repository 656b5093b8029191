"""The TensorRT target's weight domain: each linear as the TensorRT variant's graph holds it.

The variant (docs/tensorrt-rules.md, "Implementation") feeds a linear whose input activation
is quantized the integer codes C = X̂/c + z instead of X̂, and folds X̂ = c∘(C − z) into the
weight: W' = W·diag(c), bias b − z·W'. The matrix it multiplies is therefore W', and the
error that reaches the output is (C − z)(W' − Q(W'))ᵀ, whose inputs x' = x/c have the Hessian
H' = diag(1/c) H diag(1/c) (computed from the same calibration inputs as H). Handing W' and H'
to the weight methods makes GPTQ, GPTQT and LoRC optimize what is exported; the plan then
stores codes of W' with c beside them (plan_weights, "Folded input scale").

W' takes one symmetric scale per output row and scale group, the groups cut from c's values
(rptq.quant.trt_weights.scale_groups, as the export re-quantizes an ONNX Runtime RTN plan):
an outlier cluster's columns of W' are 10-100x the others', and a single per-row scale would
round the others to a few codes. The plan stores the groups as the weight's `group_index`
(scale/zero [out, groups]); GPTQT's binary planes keep one group (its planes carry one scale
per row).

Linears whose input is not quantized (A16, KV-only recipes) keep the model's weight: the
variant exports their asymmetric codes unchanged, so only the LoRC factors become symmetric.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from numpy.typing import NDArray

from rptq.calib.weight_methods import AdjustFn, LinearProblem
from rptq.plan import ActQuant, ReorderSite, folded_input_scale
from rptq.points import LINEAR_INPUT_ACT
from rptq.quant.trt_weights import fold_input_scale, scale_groups


def input_scales(acts: list[ActQuant], sites: list[ReorderSite]) -> dict[str, NDArray[np.float32]]:
    """Linear -> folded input scale (rptq.plan.folded_input_scale) of one layer's linears whose
    input activation is quantized."""
    scales = {linear: folded_input_scale(acts, sites, linear) for linear in LINEAR_INPUT_ACT}
    return {linear: scale for linear, scale in scales.items() if scale is not None}


def fold_problem(
    problem: LinearProblem, scale: NDArray[np.float32] | None, groups: int = 1
) -> LinearProblem:
    """The problem in the variant's domain: W' = W·diag(c) (float32), H' = diag(1/c) H diag(1/c),
    with c's `groups` scale groups (none when c has a single group).

    Without a scale (input not quantized) only `symmetric` is set.
    """
    if scale is None:
        return replace(problem, symmetric=True)
    weight = problem.weight.detach().to(torch.float32).cpu().numpy()
    folded = torch.from_numpy(fold_input_scale(weight, scale)).to(problem.weight.device)
    hessian = problem.hessian
    if hessian is not None:
        inverse = torch.from_numpy(1.0 / scale.astype(np.float64)).to(hessian.device)
        hessian = (hessian.double() * inverse[:, None] * inverse[None, :]).to(hessian.dtype)
    group_of = scale_groups(scale, groups)
    return replace(
        problem,
        weight=folded,
        hessian=hessian,
        folded_scale=scale.copy(),
        symmetric=True,
        scale_groups=group_of if group_of.max(initial=0) > 0 else None,
    )


def trt_adjust(acts: list[ActQuant], sites: list[ReorderSite], groups: int = 1) -> AdjustFn:
    """The `adjust` hook of quantize_layer for one layer of a `--target tensorrt` recipe
    (`groups`: the recipe's trt_weight_groups)."""
    scales = input_scales(acts, sites)

    def adjust(linear: str, problem: LinearProblem) -> LinearProblem:
        return fold_problem(problem, scales.get(linear), groups)

    return adjust
