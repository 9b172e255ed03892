"""Export time: a LoRA-adapted model written as a merged HF checkpoint plus a PEFT adapter.

Ours: `save_merged_hf` (merge in float32, cast, write safetensors) + `save_peft_adapter`.
Reference: peft on transformers with the very same adapter: `save_pretrained` of the
adapter, then `merge_and_unload()` + `save_pretrained` of the merged model. Same random
float32 Qwen2 (Qwen2.5-0.5B widths, few layers, smaller vocab so it fits a laptop), the
same rank-8 adapter on all seven projections, the same disk. Rounds alternate between
the two (machine load hits both alike); best round counts. Also checks that the two
merged checkpoints hold the same tensors.

The last line printed is one JSON object:
{"name", "ours", "reference", "unit", "ratio", ...settings}.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

CONFIG = dict(
    vocab_size=32768,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=4,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM as HFQwen2

    from mllm_jax.export import save_merged_hf, save_peft_adapter
    from mllm_jax.model import load_hf
    from mllm_jax.model.lora import LoRAConfig, apply_lora, lora_layers

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_export-"))
    try:
        torch.manual_seed(0)
        config = HFConfig(**{**CONFIG, "num_hidden_layers": args.layers})
        HFQwen2(config).to(torch.float32).save_pretrained(work / "base")

        ours = load_hf(work / "base")
        apply_lora(ours, LoRAConfig(rank=args.rank), key=0)
        for i, linear in enumerate(lora_layers(ours).values()):
            b = linear.lora.b
            b.set_value(jax.random.normal(jax.random.key(i), b.shape) * 0.02)
        save_peft_adapter(ours, work / "adapter_seed")  # the same adapter for peft

        def run_ours(k: int) -> float:
            start = time.perf_counter()
            save_merged_hf(ours, work / f"ours_merged_{k}")
            save_peft_adapter(ours, work / f"ours_adapter_{k}")
            return time.perf_counter() - start

        base_torch = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32)

        def run_reference(k: int) -> float:
            model = PeftModel.from_pretrained(copy.deepcopy(base_torch), str(work / "adapter_seed"))
            start = time.perf_counter()
            model.save_pretrained(str(work / f"ref_adapter_{k}"))
            model.merge_and_unload().save_pretrained(str(work / f"ref_merged_{k}"))
            return time.perf_counter() - start

        run_ours(-1)  # compile the merge once, as a real export after training has
        ours_times, ref_times = [], []
        for k in range(args.rounds):
            ours_times.append(run_ours(k))
            ref_times.append(run_reference(k))
            if k:
                for name in (
                    f"ours_merged_{k}",
                    f"ours_adapter_{k}",
                    f"ref_merged_{k}",
                    f"ref_adapter_{k}",
                ):
                    shutil.rmtree(work / name)

        mine = load_file(str(work / "ours_merged_0" / "model.safetensors"))
        theirs = load_file(str(work / "ref_merged_0" / "model.safetensors"))
        assert sorted(mine) == sorted(theirs), set(mine) ^ set(theirs)
        max_diff = max(float(np.abs(mine[k] - theirs[k]).max()) for k in mine)
        result = {
            "name": "export_merged_plus_peft_adapter",
            "ours": round(min(ours_times), 3),
            "reference": round(min(ref_times), 3),
            "unit": "s",
            "ratio": round(min(ours_times) / min(ref_times), 3),
            "reference_impl": "peft save_pretrained + merge_and_unload + save_pretrained",
            "layers": args.layers,
            "hidden": CONFIG["hidden_size"],
            "vocab": CONFIG["vocab_size"],
            "rank": args.rank,
            "dtype": "float32",
            "merged_max_abs_diff": max_diff,
            "rounds": args.rounds,
            "threads": args.threads,
            "backend": jax.default_backend(),
        }
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
