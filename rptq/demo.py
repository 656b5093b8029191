"""`rptq-export demo`: the whole pipeline, offline, on an embedded tiny model.

No download and no data directory: a small OPT is trained for a few hundred steps on a
synthetic, seeded corpus of English-like sentences (bytes as tokens), then calibrated with
RPTQ at several bit widths, exported to ONNX, and evaluated in PyTorch (fake-quant reference)
and ONNX Runtime side by side. A random untrained model would have perplexity near the vocabulary
size whatever the quantization, which would show nothing.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from rptq.log import human_bytes, stage

log = logging.getLogger(__name__)

SEQ_LEN = 128
DEMO_RECIPES: tuple[dict[str, Any], ...] = (
    {"wbits": 8, "abits": 8},
    {"wbits": 4, "abits": 8},
    {"wbits": 4, "abits": 4},
    {"wbits": 4, "abits": 4, "only_quant_kv": True},
    {"wbits": 3, "abits": 3, "only_quant_kv": True},
)
DEMO_CLUSTERS = {"R1": 8, "R2": 4, "R3": 4, "R4": 8, "R5": 16}

_SUBJECTS = (
    "the cat",
    "a dog",
    "the old man",
    "my sister",
    "the bird",
    "a child",
    "the teacher",
    "our neighbour",
    "the farmer",
    "a young girl",
    "the doctor",
    "his brother",
)
_VERBS = (
    "sees",
    "likes",
    "finds",
    "follows",
    "paints",
    "calls",
    "carries",
    "helps",
    "watches",
    "remembers",
    "visits",
    "answers",
)
_OBJECTS = (
    "a red ball",
    "the small house",
    "an apple",
    "the blue boat",
    "a letter",
    "the moon",
    "a wooden chair",
    "the green door",
    "a long road",
    "the cold river",
    "a new book",
)
_PLACES = (
    "in the garden",
    "near the river",
    "at home",
    "on the hill",
    "after dinner",
    "before noon",
    "in the city",
    "by the sea",
    "under the bridge",
    "every morning",
)


def synthetic_corpus(sentences: int, seed: int) -> str:
    """Seeded sentences from a tiny grammar: learnable in seconds, free of licences."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.7:
            words.append(rng.choice(_PLACES))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + ".")
    return " ".join(out)


def byte_windows(text: str, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows of the text's bytes (the demo's tokenizer is the identity)."""
    ids = torch.tensor(list(text.encode("ascii")), dtype=torch.long)
    count = len(ids) // seq_len
    return ids[: count * seq_len].view(count, seq_len)


def train_tiny_model(steps: int, seed: int = 0) -> Any:
    """A 2-layer OPT (hidden 64) trained on the synthetic corpus; deterministic for a seed."""
    from rptq.tiny import make_tiny_opt

    torch.manual_seed(seed)
    model = make_tiny_opt(
        hidden_size=64,
        num_heads=4,
        ffn_dim=256,
        vocab_size=256,
        max_positions=SEQ_LEN,
        seed=seed,
        weight_std=0.02,
    )
    windows = byte_windows(synthetic_corpus(6000, seed=1), SEQ_LEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = windows[torch.randint(0, len(windows), (16,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def run_demo(output_dir: Path | None, steps: int = 200) -> dict[str, Any]:
    """Train, calibrate, export and evaluate; returns the CLI summary."""
    from rptq.exporter.options import ExportOptions
    from rptq.model.load import from_module
    from rptq.plan import Recipe
    from rptq.runtime.ort import OrtLogits, make_session
    from rptq.runtime.perplexity import perplexity
    from rptq.runtime.reference import ReferenceModel
    from rptq.workflow import calibrate_windows, export_onnx

    started = time.perf_counter()
    keep = output_dir is not None
    workdir = Path(output_dir or tempfile.mkdtemp(prefix="rptq-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with stage(1, 3, f"training an embedded 2-layer OPT for {steps} steps on a synthetic corpus"):
        model = from_module(train_tiny_model(steps), name="rptq-demo-opt")
        calib = byte_windows(synthetic_corpus(600, seed=2), SEQ_LEN)[:32]
        evaluation = byte_windows(synthetic_corpus(400, seed=3), SEQ_LEN)
        fp_ppl = perplexity(ReferenceModel(model), evaluation, desc="fp").ppl
    rows = [f"{'recipe':<9} {'PyTorch ppl':>11} {'ORT ppl':>9} {'diff':>8} {'onnx size':>10}"]
    rows.append(f"{'FP32':<9} {fp_ppl:>11.3f} {'':>9} {'':>8} {'':>10}")
    results: dict[str, Any] = {}
    with stage(2, 3, f"calibrating and exporting {len(DEMO_RECIPES)} recipes"):
        plans = []
        for fields in DEMO_RECIPES:
            recipe = Recipe(
                **fields,
                clusters=dict(DEMO_CLUSTERS),
                calib_dataset="demo",
                nsamples=len(calib),
                seq_len=SEQ_LEN,
            )
            plan = calibrate_windows(model, calib, recipe)
            onnx_path = workdir / f"demo-{recipe.label().lower()}.onnx"
            # the CLI's default graph (with a KV cache); OrtLogits scores it as one prefill step
            options = ExportOptions(force=True, past=True)
            summary = export_onnx(model, plan, onnx_path, options)
            plans.append((plan, onnx_path, summary))
    with stage(3, 3, "perplexity: PyTorch fake-quant reference vs ONNX Runtime"):
        for plan, onnx_path, summary in plans:
            label = plan.recipe.label()
            ref = perplexity(ReferenceModel(model, plan), evaluation, desc=f"ref {label}").ppl
            ort = perplexity(
                OrtLogits(make_session(onnx_path)), evaluation, desc=f"ort {label}"
            ).ppl
            diff = 100 * (ort - ref) / ref
            rows.append(
                f"{label:<9} {ref:>11.3f} {ort:>9.3f} {diff:>7.3f}% "
                f"{human_bytes(summary.total_bytes):>10}"
            )
            results[label] = {"reference_ppl": ref, "ort_ppl": ort, "qdq_nodes": summary.qdq_nodes}
    if not keep:
        for file in workdir.iterdir():
            file.unlink()
        workdir.rmdir()
    return {
        "demo": "tiny OPT (2 layers, hidden 64), byte tokens, synthetic corpus",
        "eval windows": f"{len(evaluation)} x {SEQ_LEN} tokens",
        "table": rows,
        "outputs": str(workdir) if keep else "removed (pass --output-dir to keep them)",
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
