"""tools/bench_infer.py at a tiny size: ours (prefix KV cache shared), the transformers
peer (the same weights exported, its own DynamicCache reused per chunk) and the no-reuse
ablation score the same prompts; the peer's class probabilities equal ours."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scoring_models import tiny_scoring_config

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import bench_infer


def test_bench_infer_scores_like_transformers(capsys):
    argv = ["--shots", "12", "--features", "3", "--queries", "5", "--chunk-size", "3"]
    bench_infer.main([*argv, "--no-generate", "--prefill-chunk", "256", "--threads", "1"])
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["name"] == "infer_label_scoring"
    assert record["reference_impl"].startswith("transformers ")
    # ratio is rounded from the exact rates, ours and reference from their own rounding
    expected = record["ours"] / record["reference"]
    assert record["ratio"] == pytest.approx(expected, rel=2e-3, abs=1e-3)
    assert record["max_prob_diff"] < 1e-5 and record["same_predictions"] == 1.0
    assert record["ablation_no_reuse"]["max_prob_diff"] < 1e-5
    assert {"reuse", "no_reuse", "transformers"} <= set(record["cpu_seconds"])
    assert "1 threads (best of [1])" in record["reference_impl"]


def test_transformers_scoring_reads_the_label_logits_slot_by_slot():
    """The peer's slot loop against transformers without any cache: every chunk's whole
    prompt + answer (the peer's own greedy labels in the slots) in one forward pass."""
    import torch

    from mllm_jax.infer import answer_frame, build_chunked_prompt, from_model
    from mllm_jax.model import init_model

    config = tiny_scoring_config()
    model = init_model(config, 0)
    loaded = from_model(model)
    rng = np.random.default_rng(0)
    shots, y = rng.normal(size=(6, 2)), rng.integers(0, 3, 6)
    import pandas as pd

    prompt = build_chunked_prompt(
        loaded.prompt_tokenizer,
        pd.DataFrame(shots),
        y,
        pd.DataFrame(rng.normal(size=(5, 2))),
        chunk_size=3,
    )
    frame = answer_frame(loaded.prompt_tokenizer, 3)
    digits = np.asarray(loaded.prompt_tokenizer.digit_ids)
    hf = bench_infer.load_transformers(model, 1, "float32")
    got = bench_infer.transformers_scoring(hf, prompt, frame, digits, 3)
    assert got.shape == (5, 3)
    for c, rows in enumerate(prompt.rows):
        answer = frame.ids.copy()
        answer[frame.slots] = digits[
            got[rows.start : rows.start + 3].argmax(-1).tolist() + [0] * (3 - len(rows))
        ]
        ids = np.concatenate([prompt.full_ids(c), answer[len(frame.head) :]])
        with torch.inference_mode():
            logits = hf(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].float()
        start = len(prompt.full_ids(c)) - 1  # predicts slot 0
        at = start + frame.slots[: len(rows)] - frame.slots[0]
        expected = torch.log_softmax(logits[at][:, digits[:3]], -1).numpy()
        np.testing.assert_allclose(np.exp(got[rows.start : rows.stop]), np.exp(expected), atol=1e-5)
