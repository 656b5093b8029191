"""Issue 13, part 3 probe: the W16 A4/A8 quality ladder (per tensor / RPTQ clusters / per channel,
default `mse` metric) on the CI outlier model and on the bench's hidden-256 outlier model.

The question: does the CI model (tests/parity/test_outlier_ladder.py) ask too little at A4
because it is small? Prints one JSON line per (model, bits, granularity): logit SQNR vs FP.

    python bench/ladder_a4.py
"""
# ruff: noqa: E402, E501, E702, I001
import json
import sys
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import torch
from rptq.calib.runner import calibrate
from rptq.data import calibration_windows, eval_tokens, eval_windows, load_tokenizer
from rptq.model.load import from_module
from rptq.outliers import make_outlier_opt
from rptq.plan import Recipe
from rptq.runtime.parity import sqnr_db
from rptq.runtime.reference import ReferenceModel
from tests.conftest import TINY_CLUSTERS
from common import default_data_dir
out = []
# CI shape, random tokens (as tests/parity/test_outlier_ladder.py), TINY and default clusters
m = from_module(make_outlier_opt(hidden_size=64, num_layers=2, ffn_dim=256, weight_std=0.05), "ci")
g = torch.Generator().manual_seed(1)
calib = torch.randint(0, 512, (16, 32), generator=g); ev = torch.randint(0, 512, (8, 32), generator=g)
fp = ReferenceModel(m)(ev)
for abits in (4, 8):
    for gran in ("tensor", "cluster", "channel"):
        r = Recipe(wbits=16, abits=abits, granularity=gran, clusters=dict(TINY_CLUSTERS), nsamples=16, seq_len=32, calib_dataset="random")
        p = calibrate(m, calib, r)
        row = {"model": "ci-h64", "abits": abits, "gran": gran, "sqnr": round(sqnr_db(fp, ReferenceModel(m, p)(ev)), 2)}
        print(json.dumps(row), flush=True)
# CI shape with more calibration/eval data (64 x 64 random tokens)
calib2 = torch.randint(0, 512, (64, 64), generator=g); ev2 = torch.randint(0, 512, (16, 64), generator=g)
fp2 = ReferenceModel(m)(ev2)
for abits in (4,):
    for gran in ("tensor", "cluster", "channel"):
        r = Recipe(wbits=16, abits=abits, granularity=gran, clusters=dict(TINY_CLUSTERS), nsamples=64, seq_len=64, calib_dataset="random")
        p = calibrate(m, calib2, r)
        print(json.dumps({"model": "ci-h64-more-data", "abits": abits, "gran": gran, "sqnr": round(sqnr_db(fp2, ReferenceModel(m, p)(ev2)), 2)}), flush=True)
# bench shape hidden 256
shape = {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "ffn_dim": 1024, "vocab_size": 50272, "max_positions": 512, "weight_std": 0.05}
m = from_module(make_outlier_opt(**shape), "h256")
dd = default_data_dir(); tok = load_tokenizer(None, dd)
calib = calibration_windows("c4-sample", tok, 8, 256, 2, dd)
ev = eval_windows(eval_tokens("wikitext2", tok, dd, 256).tokens, 256)[:4]
fpm = ReferenceModel(m); fp = torch.cat([fpm(ev[i:i+1]) for i in range(4)])
for abits in (4,):
    for gran in ("tensor", "cluster", "channel"):
        r = Recipe(wbits=16, abits=abits, granularity=gran, calib_dataset="c4-sample", nsamples=8, seq_len=256, seed=2)
        p = calibrate(m, calib, r); q = ReferenceModel(m, p)
        t = torch.cat([q(ev[i:i+1]) for i in range(4)])
        print(json.dumps({"model": "bench-h256", "abits": abits, "gran": gran, "sqnr": round(sqnr_db(fp, t), 2)}), flush=True)
