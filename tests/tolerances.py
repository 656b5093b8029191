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
# Where one tie flip cascades, the steps of later activations are no bound at all: a flipped
# 4-bit code (a large step) moves the residual, and the 8-bit LayerNorm output after it moves
# many of its fine steps; GPTQT's per-plane GEMMs and LoRC branches also reassociate sums.
# Which windows hold a tie depends on the CPU's GEMM kernels (MLAS/oneDNN pick AVX-512 on Intel
# Xeon, AVX2 on AMD EPYC, with other accumulation orders). Measured on the AMD EPYC, tiny
# gptq+lorc-W4A4, 12 sets of 4x64 eval windows: the first differing activation was always one
# step in at most 0.006% of codes, yet on two sets the cascade reached 15 and 7 steps (the
# Intel Xeon saw 4 steps, 0.62% of codes, on the default windows). So for calibrated-for-
# TensorRT plans the check is: every DQ output exactly on its grid, and the first activation
# in data-flow order that differs at all differs as a tie flip does: one step, in at most 0.1%
# of codes (measured at most 0.025% over all settings). A wrong weight moves whole rows (the
# negative control), a wrong scale whole clusters. What the cascade does to the output is
# bounded by LOGITS_MIN_SQNR_DB and PPL_MAX_REL_DIFF below.
QDQ_FIRST_FLIP_MAX_STEPS = 1.0
QDQ_FIRST_FLIP_MAX_FRACTION = 0.001
# Logit SQNR of ORT vs the reference. Flipped codes propagate, so logits are not bit-equal;
# 30 dB means the noise energy is 0.1% of the signal. The negative control (one cluster scale
# perturbed) must fall below it.
LOGITS_MIN_SQNR_DB = 30.0
# Perplexity of ORT vs the reference, relative (the acceptance bound).
PPL_MAX_REL_DIFF = 0.005

# TensorRT engine of the FP16 graph (strongly typed: FP16 storage and math, FP32 accumulation
# in GEMMs and LayerNorm) vs ORT CPU on the FP32 graph. Not yet measured: TensorRT cannot be
# installed where these tests were written. FP16 rounding alone (2^-11 relative per op) keeps
# logits far above the 30 dB the Q/DQ parity uses; tighten after the first GPU run.
TRT_FP16_LOGITS_MIN_SQNR_DB = 30.0
TRT_FP16_PPL_MAX_REL_DIFF = 0.01

# TensorRT variant exported in float16 (ORT CPU) vs its fp32 PyTorch reference. U = X/s + z is
# held in fp16 (11-bit mantissa, about 4e-3 absolute at |U| = 8), so A4 codes near a rounding
# boundary flip: measured on the tiny model 20.8 dB at W4A4 (the default target's fp16 export:
# 21.8 dB), 33.1 dB at W4A8, 61.6 dB at W4A16. A wrong fold or scale cast gives < 12 dB.
TRT_VARIANT_FP16_MIN_SQNR_DB = 18.0

# Decode step t of a with-past graph (cache built token by token) vs the prefill graph's logits
# at position t, fp32, ORT CPU. The arithmetic is the same; only the GEMM shapes differ ([1, T]
# queries instead of [T, T], so other blocking and accumulation order) and the softmax sums
# run over T live keys instead of T live keys plus exp(lowest) = 0 terms. That is a few ulps of
# O(1) logits, as for the folded graph (FOLD_ATOL): measured 1.5e-6 max abs on the tiny model.
INCREMENTAL_FP32_ATOL = 1e-5
INCREMENTAL_FP32_RTOL = 1e-5
# Quantized with-past graphs, decode step t vs the prefill graph's position t (and the graph vs
# the reference's incremental path, same prefix): the ulp differences above are absorbed by the
# quantization grids unless a value lies within float error of a rounding boundary; then one
# code flips and moves later logits a little, as in the QDQ parity. So the bound per position
# is the logit SQNR of the QDQ parity (LOGITS_MIN_SQNR_DB). Measured on the tiny calibrated
# W4A8/W4A4/W4A4KV models: no flip at all (max |diff| 1.5e-6, SQNR above 125 dB); position_ids
# off by one (the negative control) gives about 4 dB.
INCREMENTAL_QDQ_MIN_SQNR_DB = 30.0
# The same comparison in float16 (every tensor fp16, ORT CPU): each reassociated sum is rounded
# to fp16, whose ulp is 2^-8 = 3.9e-3 for logits in [4, 8) (the tiny model's reach 4.4), so a
# couple of ulps of the largest logits; measured 9.8e-4 max abs. The fp16-vs-fp32 graph gap is
# 3.5e-3 (tests/graph/test_export_fp.py, FP16_ATOL = 1e-2), the same order.
INCREMENTAL_FP16_ATOL = 1e-2
# TensorRT variant vs the default target on an outlier model (issue 13: "within 1 dB"), logit
# SQNR of each PyTorch reference against the FP model. Not a numerical tolerance but the
# issue's acceptance bound on a change of model: both share every activation grid, and the
# variant's weights are W·diag(s) re-quantized symmetrically per output row and scale group
# instead of W asymmetrically per row. Measured on the CI outlier model (tests/parity/
# test_trt_outliers.py; 3 model seeds): 3 scale groups (the default) are 0.7-2.2 dB *above*
# the default target at W4A8 and -0.34..+0.74 dB at W4A4 (finer scales for the wide clusters'
# columns, a coarser grid by symmetry); one scale per row is 2.0-4.4 dB below at W4A8 and
# 1.5-3.5 dB below at W4A4, so the bound separates the two forms on every seed. (On the bench's
# hidden-1024 model 3 groups are 0.74 / 0.36 dB below: bench/RESULTS.md, trt-outliers.)
TRT_OUTLIER_MAX_LOSS_DB = 1.0

# A float16 export vs the float32 export of the same plan, logits, ORT CPU, W4A4 on the tiny
# model, for either activation-quantizer form (rptq.passes.elementwise_quant). The quantizer
# reads float16 inputs (11-bit mantissa: about 4e-3 absolute at |x/s| = 8), so A4 codes within
# that of a rounding boundary flip, as in the TensorRT variant's float16 export above: measured
# 21.4 dB for the Q/DQ form and 21.5-21.6 dB for the elementwise form, which ORT's CPU provider
# feeds some producers' float32 values (it runs float16 Add/Mul/MatMul in float32 and drops the
# Cast pairs between them). The two forms differ only in which inputs are rounded: measured
# 0.1-0.2 dB apart; 1 dB is several times that and far below what a wrong scale costs.
FLOAT16_ACT_QUANT_MIN_SQNR_DB = 18.0
FLOAT16_FORMS_MAX_GAP_DB = 1.0
