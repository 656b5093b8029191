"""Every ONNX node, tensor and initializer name rptq creates is made here.

Names are the Hugging Face module path plus a role, so a pass finds "layer 3 fc1 weight" as
`model.decoder.layers.3.fc1.weight` without pattern guessing. docs/naming.md documents the
scheme; golden tests pin it. Conventions:

- initializer of a linear:  `<module>.weight` (stored transposed, [in, out], as MatMul's B),
  `<module>.bias`; LayerNorm: `<module>.weight`, `<module>.bias` (gamma, beta)
- node:                     `<module>/<role>` (role is the op type, or a word when a module
                            holds several nodes of one type)
- activation tensor:        `<module>/<role>` where module/role come from ACT_TENSOR
- Q/DQ on an activation:    `<act tensor>/QuantizeLinear`, `<act tensor>/DequantizeLinear`,
                            initializers `<act tensor>/scale`, `<act tensor>/zero_point`
- elementwise quantizer:    `<act tensor>/Div|Round|Max|Min|Mul`, initializers
                            `<act tensor>/scale`, `<act tensor>/code_min`, `<act tensor>/code_max`
- reorder of a LayerNorm input: node `<ln module>/<R>/Gather`, indices `<ln module>/<R>/perm`
- quantized weight: `<module>.weight_quantized` (+ `_scale`, `_zero_point`), node
  `<module>/weight/DequantizeLinear`, output `<module>.weight_dequantized`
"""

from __future__ import annotations

from rptq.points import Act, Reorder

GRAPH_INPUT_IDS = "input_ids"
GRAPH_ATTENTION_MASK = "attention_mask"
GRAPH_LOGITS = "logits"
# the with-past graph (docs/graph.md, "Decoder with past"): optimum's / onnxruntime-genai's names
GRAPH_POSITION_IDS = "position_ids"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

DECODER = "model.decoder"
EMBED_TOKENS = f"{DECODER}.embed_tokens"
EMBED_POSITIONS = f"{DECODER}.embed_positions"
FINAL_LAYER_NORM = f"{DECODER}.final_layer_norm"
LM_HEAD = "lm_head"
MASK_MODULE = f"{DECODER}.attention_mask"
LAYER_PREFIX = f"{DECODER}.layers."  # + index: a decoder layer's module path

# Activation -> (module under the layer, role): the tensor's name is f"{layer}.{module}/{role}".
ACT_TENSOR: dict[Act, tuple[str, str]] = {
    Act.ATTN_LN_OUT: ("self_attn_layer_norm", "output"),
    Act.Q_PROJ_OUT: ("self_attn.q_proj", "output"),
    Act.Q: ("self_attn", "q"),
    Act.K: ("self_attn", "k"),
    Act.V: ("self_attn", "v"),
    Act.ATTN_PROBS: ("self_attn", "attn_probs"),
    Act.OUT_PROJ_IN: ("self_attn.out_proj", "input"),
    Act.FFN_LN_OUT: ("final_layer_norm", "output"),
    Act.FC2_IN: ("fc2", "input"),
}


def past_key(index: int) -> str:
    """Graph input: the cached keys of decoder layer `index`, [B, H, P, hd]."""
    return f"{PAST_PREFIX}{index}.key"


def past_value(index: int) -> str:
    """Graph input: the cached values of decoder layer `index`, [B, H, P, hd]."""
    return f"{PAST_PREFIX}{index}.value"


def present_key(index: int) -> str:
    """Graph output: past plus this step's keys of decoder layer `index`, [B, H, P + S, hd]."""
    return f"{PRESENT_PREFIX}{index}.key"


def present_value(index: int) -> str:
    """Graph output: past plus this step's values of decoder layer `index`, [B, H, P + S, hd]."""
    return f"{PRESENT_PREFIX}{index}.value"


def kv_cache(act_name: str) -> dict[str, str]:
    """Names of the integer KV cache written for activation `act_name` (k or v of a layer).

    `<act>/cache/QuantizeLinear` makes the new tokens' codes (zero point
    `<act>/cache/quantize_zero_point` in the cache's container, or int16 when the zero point
    lies outside it: then `widen/Cast` to int32 and `narrow/Cast` to the cache type), `Clip`
    keeps them on the plan's grid, the Reshape/Transpose/Concat of the float graph then carry
    codes, and after the Concat `Cast -> Sub(<act>/cache/zero_point) -> Mul(<act>/cache/scale)`
    dequantizes the whole cache. `scale` and `zero_point` are float [H, 1, hd] (cache layout),
    for clients too. Behind the elementwise quantizer (`act_quant`), `<act>/cache/Add` shifts
    its codes by `<act>/cache/code_offset` (the zero point, +128 for uint8) and
    `<act>/cache/narrow/Cast` writes them in the cache's type: no second quantization.
    """
    return {
        "quantize": f"{act_name}/cache/QuantizeLinear",
        "quantize_zero_point": f"{act_name}/cache/quantize_zero_point",
        "offset_node": f"{act_name}/cache/Add",
        "code_offset": f"{act_name}/cache/code_offset",
        "shifted": f"{act_name}/cache/shifted_codes",
        "codes": f"{act_name}/cache/codes",
        "clip": f"{act_name}/cache/Clip",
        "clip_min": f"{act_name}/cache/clip_min",
        "clip_max": f"{act_name}/cache/clip_max",
        "clipped": f"{act_name}/cache/clipped",
        "widen_node": f"{act_name}/cache/widen/Cast",
        "widened": f"{act_name}/cache/widened",
        "cast_node": f"{act_name}/cache/Cast",
        "cast_codes": f"{act_name}/cache/wide_codes",
        "narrow_node": f"{act_name}/cache/narrow/Cast",
        "narrowed": f"{act_name}/cache/narrowed",
        "sub_node": f"{act_name}/cache/Sub",
        "zero_point": f"{act_name}/cache/zero_point",
        "centered": f"{act_name}/cache/centered",
        "mul_node": f"{act_name}/cache/Mul",
        "scale": f"{act_name}/cache/scale",
        "dequantized": f"{act_name}/cache/dequantized",
    }


def layer(index: int) -> str:
    """Module path of decoder layer `index`."""
    return f"{LAYER_PREFIX}{index}"


def module(index: int, name: str) -> str:
    """Module path of `name` (e.g. "self_attn.q_proj", "fc1") inside decoder layer `index`."""
    return f"{layer(index)}.{name}"


def node(module_path: str, role: str) -> str:
    """Name of a node: module path plus its role."""
    return f"{module_path}/{role}"


def tensor(module_path: str, role: str) -> str:
    """Name of an intermediate tensor produced inside a module."""
    return f"{module_path}/{role}"


def weight(module_path: str) -> str:
    """Initializer of a linear's weight (transposed, [in, out]) or a LayerNorm's gamma."""
    return f"{module_path}.weight"


def bias(module_path: str) -> str:
    """Initializer of a linear's bias or a LayerNorm's beta."""
    return f"{module_path}.bias"


def act_tensor(index: int, act: Act) -> str:
    """Name of activation `act` of layer `index` in the exported graph."""
    sub, role = ACT_TENSOR[act]
    return tensor(module(index, sub), role)


def act_quant(act_name: str) -> dict[str, str]:
    """Names of the elementwise per-cluster quantizer on activation tensor `act_name` (the
    ONNX Runtime target's default form, docs/graph.md "ONNX Runtime kernels"):
    `Div(<act>/scale) -> Round -> Max(<act>/code_min) -> Min(<act>/code_max)` makes the codes
    minus the zero point (`<act>/codes`), `Mul(<act>/scale)` dequantizes them into
    `<act>/dequantized`, the tensor the per-axis Q/DQ form writes too. float16 graphs compute
    it in float32 between `<act>/float32/Cast` and `<act>/Cast`, as ORT's Q/DQ kernels do.
    """
    return {
        "cast_in_node": f"{act_name}/float32/Cast",
        "float32_input": f"{act_name}/float32",
        "div_node": f"{act_name}/Div",
        "scale": f"{act_name}/scale",
        "scaled": f"{act_name}/scaled",
        "round_node": f"{act_name}/Round",
        "rounded": f"{act_name}/rounded",
        "max_node": f"{act_name}/Max",
        "code_min": f"{act_name}/code_min",
        "codes_low": f"{act_name}/codes_low",
        "min_node": f"{act_name}/Min",
        "code_max": f"{act_name}/code_max",
        "codes": f"{act_name}/codes",
        "mul_node": f"{act_name}/Mul",
        "dequantized_float32": f"{act_name}/dequantized_float32",
        "cast_out_node": f"{act_name}/Cast",
        "dequantized": f"{act_name}/dequantized",
    }


def qdq(act_name: str) -> dict[str, str]:
    """Names of the Q/DQ pair (and its initializers) inserted on activation tensor `act_name`."""
    return {
        "quantize": f"{act_name}/QuantizeLinear",
        "dequantize": f"{act_name}/DequantizeLinear",
        "quantized": f"{act_name}/quantized",
        "dequantized": f"{act_name}/dequantized",
        "unclamped": f"{act_name}/unclamped",
        "scale": f"{act_name}/scale",
        "zero_point": f"{act_name}/zero_point",
        "clip_min": f"{act_name}/clip_min",
        "clip_max": f"{act_name}/clip_max",
        "clip_min_node": f"{act_name}/Max",
        "clip_max_node": f"{act_name}/Min",
        "clipped_low": f"{act_name}/clipped_low",
        "clipped": f"{act_name}/clipped",
    }


def reorder_gather(ln_module: str, point: Reorder) -> dict[str, str]:
    """Names of the Gather that reorders a LayerNorm's input for reorder point `point`."""
    return {
        "node": f"{ln_module}/{point}/Gather",
        "perm": f"{ln_module}/{point}/perm",
        "output": f"{ln_module}/{point}/input",
    }


def quantized_weight(module_path: str) -> dict[str, str]:
    """Names of a linear weight stored as integer codes plus its DequantizeLinear."""
    return {
        "codes": f"{module_path}.weight_quantized",
        "scale": f"{module_path}.weight_scale",
        "zero_point": f"{module_path}.weight_zero_point",
        "node": f"{module_path}/weight/DequantizeLinear",
        "output": f"{module_path}.weight_dequantized",
    }


def binary_weight(module_path: str, planes: int) -> dict[str, str]:
    """Names of a GPTQT weight: `planes` INT4/INT2 ±1 planes, one DequantizeLinear each
    (scale α_i per output channel, zero point 0), plus the offset β.

    Both targets multiply each plane on its own, so that the runtime fuses every plane's
    DequantizeLinear into an integer GEMM (plane 0 in `<module>/MatMul`, plane i > 0 in
    `plane{i}_matmul`), and sum the products with the `sum{i}` nodes; ONNX Runtime then adds
    ReduceSum(x)·β (`input_sum*`, `offset_*`). `output`/`offset_node` name the older form
    (planes summed into `<module>.weight_dequantized`), kept for the names' golden list.
    """
    out = {
        "offset": f"{module_path}.weight_offset",
        "offset_node": f"{module_path}/weight/offset/Add",
        "output": f"{module_path}.weight_dequantized",
        # ONNX Runtime form (one GEMM per plane, as TensorRT): y = Σ x·(α_i b_i) + ΣxΣ · β
        "input_sum_node": f"{module_path}/weight/offset/ReduceSum",
        "input_sum_axes": f"{module_path}/weight/offset/axes",
        "input_sum": f"{module_path}/weight/offset/input_sum",
        "offset_mul_node": f"{module_path}/weight/offset/Mul",
        "offset_product": f"{module_path}/weight/offset/product",
        "offset_output": f"{module_path}/weight/offset/output",
    }
    for i in range(planes):
        out[f"plane{i}"] = f"{module_path}.weight_plane{i}"
        out[f"plane{i}_scale"] = f"{module_path}.weight_plane{i}_scale"
        out[f"plane{i}_zero_point"] = f"{module_path}.weight_plane{i}_zero_point"
        out[f"plane{i}_node"] = f"{module_path}/weight/plane{i}/DequantizeLinear"
        out[f"plane{i}_dequantized"] = f"{module_path}.weight_plane{i}_dequantized"
        if i > 0:  # running sum of planes 0..i
            out[f"sum{i}_node"] = f"{module_path}/weight/plane{i}/Add"
            out[f"sum{i}"] = f"{module_path}.weight_sum{i}"
            out[f"plane{i}_matmul"] = f"{module_path}/weight/plane{i}/MatMul"
            out[f"plane{i}_product"] = f"{module_path}/weight/plane{i}/product"
    return out


def weight_groups(module_path: str, groups: int) -> dict[str, str]:
    """Names around a TensorRT-variant weight with activation-scale groups: the groups' codes
    side by side in one weight (`quantized_weight`'s names), one MatMul writing [..., groups x
    out], split into the groups' products (`part{g}`) and summed into `output`.
    """
    out = {
        "split_node": f"{module_path}/weight/groups/Split",
        "split_sizes": f"{module_path}/weight/groups/split",
        "sum_node": f"{module_path}/weight/groups/Sum",
        "output": f"{module_path}/weight/groups/sum",
    }
    for g in range(groups):
        out[f"part{g}"] = f"{module_path}/weight/group{g}/product"
    return out


def lorc(module_path: str) -> dict[str, str]:
    """Names of a LoRC branch `x -> MatMul(V̂ [in, R]) -> MatMul(Ûᵀ [R, out]) -> Add` beside a
    linear's MatMul; factors are float initializers, or int8 codes with a DequantizeLinear.
    """
    out = {
        "add_node": f"{module_path}/lorc/Add",
        "output": f"{module_path}/lorc/output",
    }
    for factor in ("v", "u"):
        out[factor] = f"{module_path}.lorc_{factor}"
        out[f"{factor}_quantized"] = f"{module_path}.lorc_{factor}_quantized"
        out[f"{factor}_scale"] = f"{module_path}.lorc_{factor}_scale"
        out[f"{factor}_zero_point"] = f"{module_path}.lorc_{factor}_zero_point"
        out[f"{factor}_dq_node"] = f"{module_path}/lorc/{factor}/DequantizeLinear"
        out[f"{factor}_dequantized"] = f"{module_path}.lorc_{factor}_dequantized"
        out[f"{factor}_matmul"] = f"{module_path}/lorc/{factor}/MatMul"
        out[f"{factor}_output"] = f"{module_path}/lorc/{factor}_output"
    return out


def trt_act(act_name: str) -> dict[str, str]:
    """Names of the TensorRT variant's nodes around activation tensor `act_name`.

    Producer side (where the fold into a producer is not exact): `Div(s)` and `Add(z)`, or
    `Sub(c)` for a per-tensor grid, writing `<act>/folded` (the tensor the INT8 Q reads);
    a scalar `Clip` to the bits-wide grid before the Q; consumer side (no weight to fold
    into): `Sub(z)` then `Mul(s)`, or `Add(c)`, writing `<act>/restored`.
    """
    return {
        "div_node": f"{act_name}/fold/Div",
        "div_scale": f"{act_name}/fold/scale",
        "divided": f"{act_name}/fold/divided",
        "shift_node": f"{act_name}/fold/Add",
        "shift": f"{act_name}/fold/zero_point",
        "offset_node": f"{act_name}/fold/Sub",
        "offset": f"{act_name}/fold/offset",
        "folded": f"{act_name}/folded",
        "clip_node": f"{act_name}/Clip",
        "clip_min": f"{act_name}/clip_min",
        "clip_max": f"{act_name}/clip_max",
        "clipped": f"{act_name}/clipped",
        "unshift_node": f"{act_name}/unfold/Sub",
        "unshift": f"{act_name}/unfold/zero_point",
        "centered": f"{act_name}/unfold/centered",
        "rescale_node": f"{act_name}/unfold/Mul",
        "rescale": f"{act_name}/unfold/scale",
        "unoffset_node": f"{act_name}/unfold/Add",
        "unoffset": f"{act_name}/unfold/offset",
        "restored": f"{act_name}/restored",
    }


def weight_zero_correction(module_path: str) -> dict[str, str]:
    """Names of `y -= ReduceSum(x) ⊗ (s_w ∘ z_w)`: an asymmetric weight on a zero-point-0 DQ.

    TensorRT's INT4 weights are symmetric and block-scaled, so a plan weight with per-row zero
    points is stored as its codes and the zero points' contribution is subtracted per token.
    """
    return {
        "reduce_node": f"{module_path}/weight_zero/ReduceSum",
        "axes": f"{module_path}/weight_zero/axes",
        "reduced": f"{module_path}/weight_zero/input_sum",
        "mul_node": f"{module_path}/weight_zero/Mul",
        "row": f"{module_path}.weight_zero_row",
        "product": f"{module_path}/weight_zero/correction",
        "sub_node": f"{module_path}/weight_zero/Sub",
        "output": f"{module_path}/weight_zero/output",
    }
