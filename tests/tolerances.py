"""Every numeric tolerance of the test suite, each with its reason."""

# Folded vs unfolded FP graphs in ORT, fp32 logits: permutations only reorder sums (MatMul
# accumulation order) and LayerNorm reductions, so differences are a few ulps of O(1) logits.
FOLD_ATOL = 1e-5
FOLD_RTOL = 1e-5

# ORT QDQ graph vs PyTorch fake-quant reference, fp32, per quantized activation. Both compute
# the same grid (a separate check asserts ORT's DQ output is *exactly* the plan's fake
# quantization of ORT's own Q input), but ORT's MatMul/LayerNorm accumulate in another order,
# so a value within float error of a rounding boundary can land on the neighbouring code, and
# that one-step flip then perturbs later layers a little. Measured on the tiny W4A4 model: at
# most 2 steps and 0.41% of codes (layer 1 ffn_ln_out); a wrong scale moves whole clusters.
QDQ_DRIFT_MAX_STEPS = 3.0
QDQ_MAX_FLIPPED_FRACTION = 0.01
# Logit SQNR of ORT vs the reference. Flipped codes propagate, so logits are not bit-equal;
# 30 dB means the noise energy is 0.1% of the signal. The negative control (one cluster scale
# perturbed) must fall below it.
LOGITS_MIN_SQNR_DB = 30.0
# Perplexity of ORT vs the reference, relative (the acceptance bound).
PPL_MAX_REL_DIFF = 0.005
