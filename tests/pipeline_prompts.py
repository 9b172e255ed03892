"""Training prompts read back (`tools/prompt_signal.py`'s parser): what the tests of the
tools that check the prompts' signal feed them."""

import sys
from collections.abc import Sequence
from pathlib import Path

from locations import TOOLS

if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

from prompt_signal import parse_prompt, read_prompts

from mllm_jax.data.pipeline import PipelineConfig, build_pipeline
from mllm_jax.encoding.sampling import SamplingConfig
from mllm_jax.encoding.tokens import load_tokenizer


def pipeline_prompts(
    paths: Sequence[Path],
    batches: int,
    sampling: SamplingConfig,
    seq_len: int,
    batch_size: int,
) -> list[tuple | None]:
    """The parsed prompts (`parse_prompt`; None where one does not parse) of the first
    `batches` training batches that one process's pipeline (seed 0) builds from the
    shards at `paths`."""
    pipeline = build_pipeline(
        [str(p) for p in paths],
        PipelineConfig(sampling=sampling, seq_len=seq_len, batch_size=batch_size),
        seed=0,
        process_index=0,
        process_count=1,
    )
    tokenizer, it, out = load_tokenizer(), iter(pipeline), []
    for _ in range(batches):
        out += [parse_prompt(text) for text in read_prompts(tokenizer, next(it))]
    return out
