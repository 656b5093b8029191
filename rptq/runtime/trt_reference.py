"""The PyTorch reference of the TensorRT variant: what `--target tensorrt` graphs compute.

Activations are fake-quantized exactly as in the default reference (the variant only moves
each cluster's scale and zero point out of the Q/DQ, which changes no value in real
arithmetic). Weights: a plan calibrated with `--target tensorrt` already holds the codes of
the folded weight W·diag(s) (GPTQ/GPTQT/LoRC included), so its entries' values() are used
verbatim, mapped back to the model's domain. For an RTN plan calibrated for ONNX Runtime, a
linear whose input activation is quantized multiplies by diag(s)·W re-quantized
symmetrically per output channel and scale group (codes·scale / s; `weight_groups`, the
export's `trt_weight_groups`); the others keep the plan's own codes. Both
come from rptq.quant.trt_weights, the functions the export passes and calibration call, so the
graph and this reference hold the same integer codes.
"""

from __future__ import annotations

import numpy as np
import torch

from rptq.errors import PlanError
from rptq.model.fakequant import FakeQuantTap
from rptq.model.forward import LayerWeights, Tap, read_layer
from rptq.model.load import LoadedModel
from rptq.model.weights import layer_prefix
from rptq.plan import QuantPlan, Target, WeightQuant
from rptq.points import LINEARS
from rptq.quant.trt_weights import DEFAULT_WEIGHT_GROUPS, trt_weight
from rptq.runtime.reference import ReferenceModel


def _identity(act: object, x: torch.Tensor) -> torch.Tensor:
    return x


def variant_weight(
    quant: WeightQuant,
    original: np.ndarray,
    in_scale: np.ndarray | None,
    target: Target,
    groups: int = DEFAULT_WEIGHT_GROUPS,
) -> np.ndarray:
    """The model-domain weight [out, in] (float32) the variant's graph multiplies X̂ by.

    Entries with a folded input scale, binary planes or LoRC factors are exported as
    calibrated (their scale must be the one the graph folds); plain codes go through
    trt_weight, which may re-quantize only an ONNX Runtime RTN plan.
    """
    if quant.folded_scale is not None or quant.binary is not None or quant.lorc is not None:
        folded = quant.folded_scale
        if (folded is None) != (in_scale is None) or (
            folded is not None and in_scale is not None and not np.array_equal(folded, in_scale)
        ):
            raise PlanError(
                f"plan weight {quant.fqn} was calibrated with other activation scales than this "
                "plan's; recalibrate with --target tensorrt"
            )
        return quant.values()
    try:
        symmetric = trt_weight(
            original,
            quant.codes,
            quant.scale,
            quant.zero,
            quant.bits,
            in_scale,
            may_requantize=target is Target.ORT,
            groups=groups,
        )
    except ValueError as exc:
        raise PlanError(
            f"plan weight {quant.fqn}: {exc}; recalibrate with --target tensorrt"
        ) from None
    return symmetric.values()


def trt_layer_weights(
    weights: LayerWeights, plan: QuantPlan, layer: int, groups: int = DEFAULT_WEIGHT_GROUPS
) -> LayerWeights:
    """One layer's weights as the TensorRT variant multiplies by them ([out, in], float32)."""
    out = dict(weights)
    prefix = layer_prefix(layer)
    for linear in LINEARS:
        quant = plan.weight(f"{prefix}.{linear}")
        if quant is None:
            continue  # float weight: the folds change no value
        key = f"{linear}.weight"
        original = weights[key]
        values = variant_weight(
            quant,
            original.detach().to(torch.float32).cpu().numpy(),
            plan.folded_input_scale(layer, linear),
            plan.recipe.target,
            groups,
        )
        out[key] = torch.from_numpy(values).to(original.device, original.dtype)
    return out


class TrtReferenceModel(ReferenceModel):
    """Callable ids [B, T] -> logits [B, T, V] of the TensorRT variant (see the module doc)."""

    def __init__(
        self,
        model: LoadedModel,
        plan: QuantPlan | None = None,
        weight_groups: int = DEFAULT_WEIGHT_GROUPS,
    ) -> None:
        if plan is not None:
            plan.check_target(Target.TRT)
        super().__init__(model, plan)
        self.weight_groups = weight_groups

    def layer(self, index: int) -> tuple[LayerWeights, Tap]:
        """Layer `index`'s variant weights and its (unchanged) activation fake-quant tap."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        weights = read_layer(self.model.weights, index)
        tap: Tap = _identity
        if self.plan is not None:
            weights = trt_layer_weights(weights, self.plan, index, self.weight_groups)
            tap = FakeQuantTap.from_plan(self.plan, index)
        if self._cache is not None:
            self._cache[index] = (weights, tap)
        return weights, tap
