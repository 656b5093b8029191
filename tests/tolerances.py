"""Every numeric tolerance of the test suite, each with its reason."""

# Folded vs unfolded FP graphs in ORT, fp32 logits: permutations only reorder sums (MatMul
# accumulation order) and LayerNorm reductions, so differences are a few ulps of O(1) logits.
FOLD_ATOL = 1e-5
FOLD_RTOL = 1e-5

# ORT QDQ graph vs PyTorch fake-quant reference, fp32. Both compute the same grid, but ORT's
# MatMul/LayerNorm accumulate in another order, so a value sitting within float error of a
# rounding boundary can land on the neighbouring code: such a flip moves the dequantized value
# by exactly one step, and never more.
QDQ_MAX_STEPS = 1.0 + 1e-3
# Fraction of codes that may flip that way (measured: well under 0.1% on the tiny model).
QDQ_MAX_FLIPPED_FRACTION = 0.01
# Logit SQNR of ORT vs the reference. Flipped codes propagate, so logits are not bit-equal;
# 30 dB means the noise energy is 0.1% of the signal. The negative control (one cluster scale
# perturbed) must fall below it.
LOGITS_MIN_SQNR_DB = 30.0
# Perplexity of ORT vs the reference, relative (the acceptance bound).
PPL_MAX_REL_DIFF = 0.005
