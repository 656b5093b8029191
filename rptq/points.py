"""The places inside an OPT decoder layer where RPTQ reorders and quantizes activations.

This table is the single description of RPTQ's reorder points (RPTQ paper, Fig. 4; see
docs/algorithms.md, section 1). Calibration, the PyTorch reference, the ONNX
passes and the names all read it, so a point is added or changed here only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Act(StrEnum):
    """Activation tensors of one decoder layer, in data-flow order."""

    ATTN_LN_OUT = "attn_ln_out"  # self_attn_layer_norm output, input of q/k/v projections
    Q_PROJ_OUT = "q_proj_out"  # q_proj output before the head_dim**-0.5 scale (statistics only)
    Q = "q"  # q after the head_dim**-0.5 scale, input of QK^T
    K = "k"  # k_proj output, input of QK^T, stored in the KV cache
    V = "v"  # v_proj output, input of PV, stored in the KV cache
    ATTN_PROBS = "attn_probs"  # softmax output P, input of PV
    OUT_PROJ_IN = "out_proj_in"  # P.V with heads concatenated, input of out_proj
    FFN_LN_OUT = "ffn_ln_out"  # final_layer_norm (FFN LayerNorm) output, input of fc1
    FC2_IN = "fc2_in"  # ReLU(fc1) output, input of fc2


class Reorder(StrEnum):
    """RPTQ's five reorder points R1..R5."""

    R1 = "R1"
    R2 = "R2"
    R3 = "R3"
    R4 = "R4"
    R5 = "R5"


@dataclass(frozen=True, slots=True)
class ReorderSpec:
    """What one reorder point clusters, and which quantizers share its clusters.

    `stats_from`: tensors whose per-channel (max, min) form the clustering points (R2 clusters
    q and k jointly, so its points are 4-D). `per_head`: clusters never cross heads, because the
    attention reshape assigns channel c to head c // head_dim. `quantized`: activation quantizers
    that use the clusters. `width`: "hidden" (d) or "ffn" (f) channels.
    """

    point: Reorder
    stats_from: tuple[Act, ...]
    per_head: bool
    quantized: tuple[Act, ...]
    width: str


REORDERS: dict[Reorder, ReorderSpec] = {
    Reorder.R1: ReorderSpec(Reorder.R1, (Act.ATTN_LN_OUT,), False, (Act.ATTN_LN_OUT,), "hidden"),
    Reorder.R2: ReorderSpec(Reorder.R2, (Act.Q_PROJ_OUT, Act.K), True, (Act.Q, Act.K), "hidden"),
    Reorder.R3: ReorderSpec(
        Reorder.R3, (Act.OUT_PROJ_IN,), True, (Act.V, Act.OUT_PROJ_IN), "hidden"
    ),
    Reorder.R4: ReorderSpec(Reorder.R4, (Act.FFN_LN_OUT,), False, (Act.FFN_LN_OUT,), "hidden"),
    Reorder.R5: ReorderSpec(Reorder.R5, (Act.FC2_IN,), False, (Act.FC2_IN,), "ffn"),
}

# Quantized activation -> the reorder point whose clusters it uses (attn_probs has none: it is
# quantized per tensor on the fixed [0, 1] grid).
SITE_OF: dict[Act, Reorder] = {
    act: spec.point for spec in REORDERS.values() for act in spec.quantized
}

# Default clusters per reorder point, as RPTQ's main.py (R2/R3 counts are per head).
DEFAULT_CLUSTERS: dict[Reorder, int] = {
    Reorder.R1: 32,
    Reorder.R2: 4,
    Reorder.R3: 4,
    Reorder.R4: 32,
    Reorder.R5: 32,
}

# Activations quantized in the full mode, and in KV-only mode (the paper's W4A4KV).
QUANTIZED_ACTS: tuple[Act, ...] = (
    Act.ATTN_LN_OUT,
    Act.Q,
    Act.K,
    Act.V,
    Act.ATTN_PROBS,
    Act.OUT_PROJ_IN,
    Act.FFN_LN_OUT,
    Act.FC2_IN,
)
KV_ACTS: tuple[Act, ...] = (Act.K, Act.V)

# LayerNorm outputs are quantized at max(8, abits) and P at a fixed 8 bits in RPTQ (its main.py
# and quantizer.py); README labels such as "W4A4" do not say so.
LN_OUTPUTS: frozenset[Act] = frozenset({Act.ATTN_LN_OUT, Act.FFN_LN_OUT})
PROBS_BITS = 8


def act_bits(act: Act, abits: int) -> int:
    """Bit width RPTQ uses for `act` when the user asks for `abits` (16 = not quantized)."""
    if abits >= 16:
        return 16
    if act is Act.ATTN_PROBS:
        return PROBS_BITS
    if act in LN_OUTPUTS:
        return max(8, abits)
    return abits


# The six linears of a decoder layer, as Hugging Face names them under `self_attn.` or the layer.
LINEARS: tuple[str, ...] = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "fc1",
    "fc2",
)

# Which reorder permutes a linear's input channels (its weight columns) and which permutes its
# output channels (weight rows and bias). Both the fold pass and the weight pass read this.
LINEAR_INPUT_SITE: dict[str, Reorder] = {
    "self_attn.q_proj": Reorder.R1,
    "self_attn.k_proj": Reorder.R1,
    "self_attn.v_proj": Reorder.R1,
    "self_attn.out_proj": Reorder.R3,
    "fc1": Reorder.R4,
    "fc2": Reorder.R5,
}
LINEAR_OUTPUT_SITE: dict[str, Reorder] = {
    "self_attn.q_proj": Reorder.R2,
    "self_attn.k_proj": Reorder.R2,
    "self_attn.v_proj": Reorder.R3,
    "fc1": Reorder.R5,
}
# The activation each linear reads (its Hessian's source; the TensorRT variant folds its cluster
# scales into the linear's rows): q/k/v share attn_ln_out.
LINEAR_INPUT_ACT: dict[str, Act] = {
    "self_attn.q_proj": Act.ATTN_LN_OUT,
    "self_attn.k_proj": Act.ATTN_LN_OUT,
    "self_attn.v_proj": Act.ATTN_LN_OUT,
    "self_attn.out_proj": Act.OUT_PROJ_IN,
    "fc1": Act.FFN_LN_OUT,
    "fc2": Act.FC2_IN,
}
# LayerNorms whose output order is a reorder point (their input is gathered, gamma/beta permuted).
LAYERNORM_SITE: dict[str, Reorder] = {
    "self_attn_layer_norm": Reorder.R1,
    "final_layer_norm": Reorder.R4,
}
# The LayerNorm that produces each LayerNorm-output activation.
LAYERNORM_OF: dict[Act, str] = {
    Act.ATTN_LN_OUT: "self_attn_layer_norm",
    Act.FFN_LN_OUT: "final_layer_norm",
}
# The quantized activation each linear produces (its output, directly or after a reshape; fc1's
# through the ReLU). out_proj and fc2 feed the residual stream, which is not quantized.
LINEAR_OUTPUT_ACT: dict[str, Act] = {
    "self_attn.q_proj": Act.Q,
    "self_attn.k_proj": Act.K,
    "self_attn.v_proj": Act.V,
    "fc1": Act.FC2_IN,
}
