"""tools/prompt_signal.py reads the training batches' prompts back: every packed prompt
parses into shots, queries and answer labels, and a nearest-neighbour reader of the
learnable tasks' prompts beats the shots' majority by far, one of coin-flip tasks not."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from fake_prior import fake_batches
from pipeline_prompts import pipeline_prompts
from prompt_signal import score

from mllm_jax.data.generate import GenerateConfig, generate
from mllm_jax.data.shards import list_corpus_shards
from mllm_jax.encoding.sampling import SamplingConfig


def _prompts(directory: Path, batches: int) -> list[tuple | None]:
    sampling = SamplingConfig(min_shots=24, max_shots=32, max_queries=8, token_budget=1536)
    return pipeline_prompts(
        list_corpus_shards(directory), batches, sampling, seq_len=2048, batch_size=2
    )


def test_prompts_read_back_carry_the_tasks_signal(tmp_path):
    # fake_batches: even task indices have labels x0 > 0, odd ones coin flips.
    generate(
        GenerateConfig(seed=3, start=0, count=40, shard_size=8, batch_size=8),
        tmp_path,
        progress=False,
        batches=fake_batches,
    )
    prompts = _prompts(tmp_path, 12)
    assert prompts and all(p is not None for p in prompts)
    for sx, sy, qx, qy in prompts:
        assert sx.shape[1] == qx.shape[1] == 4 and len(qx) == len(qy) >= 1
        assert set(sy) | set(qy) <= {0, 1}
    # The first feature's printed integer orders rows as x0 does, so within one prompt
    # the learnable tasks' labels are a threshold on it (whatever the class order).
    separated = [_threshold_separates(p) for p in prompts]
    assert sum(separated) >= len(prompts) // 3
    good = score([p for p, s in zip(prompts, separated, strict=True) if s], 5)
    noise = score([p for p, s in zip(prompts, separated, strict=True) if not s], 5)
    assert good["knn"] > good["majority"] + 0.15, good
    assert noise["knn"] < good["knn"], (noise, good)


def _threshold_separates(prompt) -> bool:
    sx, sy, qx, qy = prompt
    x, y = np.concatenate([sx[:, 0], qx[:, 0]]), np.concatenate([sy, qy])
    order = np.argsort(x, kind="stable")
    return int(np.count_nonzero(np.diff(y[order]))) <= 1
