"""tools/rule_check.py: its corpora go through the training pipeline, and the printed
prompts carry the rule: with `fixed` one threshold on the printed integer (about 500,
the normalised 0) labels every prompt's rows the same way, with `shifted` the threshold
moves from prompt to prompt."""

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from pipeline_prompts import pipeline_prompts
from rule_check import read_corpus, rule_task, score, train_config, write_corpus

from mllm_jax.encoding.sampling import SamplingConfig


def _prompts(paths: list[Path], batches: int) -> list[tuple | None]:
    sampling = SamplingConfig(min_shots=16, max_shots=32, max_queries=2, token_budget=704)
    return pipeline_prompts(paths, batches, sampling, seq_len=768, batch_size=4)


def _boundary(prompt) -> tuple[float, bool]:
    """The best single threshold on the printed feature and whether it is exact."""
    sx, sy, qx, qy = prompt
    x, y = np.concatenate([sx[:, 0], qx[:, 0]]), np.concatenate([sy, qy])
    order = np.argsort(x, kind="stable")
    changes = np.flatnonzero(np.diff(y[order]))
    if len(changes) != 1:
        return float("nan"), False
    return float(x[order][changes[0] + 1]), True


def test_rule_corpora_carry_their_rule_through_the_pipeline(tmp_path):
    fixed = write_corpus(tmp_path / "fixed", 30, 0, "fixed")
    shifted = write_corpus(tmp_path / "shifted", 30, 1, "shifted")
    cuts = {}
    for name, paths in (("fixed", fixed), ("shifted", shifted)):
        prompts = _prompts(paths, 4)
        assert prompts and all(p is not None for p in prompts)
        found = [_boundary(p) for p in prompts]
        assert all(exact for _, exact in found), name  # one threshold labels each prompt
        cuts[name] = np.array([cut for cut, _ in found])
    # Without label permutation class 1 is always above the cut; the fixed rule's cut
    # sits near the normalised 0 (printed 500) in every prompt, the shifted one moves.
    assert np.all(np.abs(cuts["fixed"] - 500) < 120), cuts["fixed"]
    assert np.std(cuts["shifted"]) > 2 * np.std(cuts["fixed"]), cuts


def test_lookup_corpus_labels_equal_printed_values_alike(tmp_path):
    """Rows that print the same integer carry the same label within a prompt, a prompt
    shows at most 8 distinct values, and both classes appear: the label is a lookup of
    the earlier equal rows, which no threshold on x explains in general."""
    prompts = _prompts(write_corpus(tmp_path / "lookup", 30, 2, "lookup"), 4)
    assert prompts and all(p is not None for p in prompts)
    not_threshold = 0
    for sx, sy, qx, qy in prompts:
        x, y = np.concatenate([sx[:, 0], qx[:, 0]]), np.concatenate([sy, qy])
        values = np.unique(x)
        assert len(values) <= 8
        assert all(len(np.unique(y[x == v])) == 1 for v in values)
        assert len(np.unique(sy)) == 2
        order = np.argsort(x, kind="stable")
        not_threshold += np.count_nonzero(np.diff(y[order])) > 1
    assert not_threshold >= len(prompts) // 4, (not_threshold, len(prompts))


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="unknown rule 'nearest'"):
        rule_task(np.random.default_rng(0), 0, 0, "nearest")


def test_train_config_points_at_the_corpus_and_keeps_labels(tmp_path):
    template = {
        "run_dir": "elsewhere",
        "model": {"base": "old", "preset": "tiny"},
        "stages": [
            {
                "name": "full",
                "steps": 10,
                "data": {
                    "kind": "shards",
                    "shards": ["a/*.array_record"],
                    "pipeline": {"sampling": {"min_shots": 16, "permute_labels": True}},
                },
            }
        ],
        "validation": {"every": 5, "data": {"kind": "shards", "shards": ["b/*"]}},
    }
    config = train_config(template, tmp_path, "new", 400, tmp_path / "d", tmp_path / "h")
    yaml.safe_dump(config)  # what the tool writes must be plain YAML
    stage = config["stages"][0]
    assert config["run_dir"] == str(tmp_path / "train") and config["model"]["base"] == "new"
    assert stage["steps"] == 400 and stage["data"]["shards"] == [f"{tmp_path}/d/*.array_record"]
    assert stage["data"]["pipeline"]["sampling"] == {"min_shots": 16, "permute_labels": False}
    assert config["validation"]["data"]["shards"] == [f"{tmp_path}/h/*.array_record"]
    assert template["stages"][0]["data"]["pipeline"]["sampling"]["permute_labels"] is True
    # Without a base the template's model stays as it is (a from-scratch run).
    scratch = train_config(template, tmp_path, None, 400, tmp_path / "d", tmp_path / "h")
    assert scratch["model"] == template["model"]


def test_score_reports_each_reader_and_the_fixed_rule_is_exact_on_its_tasks(tmp_path):
    from mllm_jax.model import init_model, preset, save_hf

    model = tmp_path / "model"  # Qwen2.5's vocabulary, so that real prompts fit
    save_hf(init_model(preset("tiny", vocab_size=151936, tie_word_embeddings=True), 0), model)
    write_corpus(tmp_path / "tasks", 3, 0, "fixed")
    tasks = read_corpus(tmp_path / "tasks", 3)
    result = score(str(model), tasks, shots=8, test_rows=4, queries=2)
    assert result["tasks"] == 3
    readers = ("mllm", "mllm_permuted", "mllm_swapped", "majority", "knn", "fixed_rule")
    assert all(0.0 <= result[name] <= 1.0 for name in readers)
    assert result["fixed_rule"] == 1.0  # the rule that made the labels
    diff = result["mllm"] - result["fixed_rule"]
    assert abs(result["mllm_minus_fixed_rule"] - diff) < 1e-12


def test_shot_slots_are_read_from_the_shots_before_them():
    from prompt_signal import shot_score

    # One prompt, 4 shots with labels 1 where the value is above 500.
    sx = np.array([[100], [900], [150], [850]])
    sy = np.array([0, 1, 0, 1])
    prompt = (sx, sy, np.array([[120]]), np.array([0]))
    got = shot_score([prompt], k=1, threshold=500)["<8"]
    # Shots 1..3: earlier majority (ties to the first seen) 0, 0, 0 -> right on shot 2;
    # 1-NN: shot 1's only neighbour is 0 (wrong), shots 2 and 3 find their match.
    # count_quantile: shot 1 (share of 1s 0: cut at the max, 100) says 1, right; shot 2
    # (share 1/2: cut at the median of 100 and 900, 500) says 0, right; shot 3 (share
    # 1/3: cut at the 2/3 quantile of 100, 900, 150, i.e. 500) says 1, right.
    expected = {
        "slots": 3,
        "majority": 1 / 3,
        "knn": 2 / 3,
        "nn1": 2 / 3,
        "threshold": 1.0,
        "count_quantile": 1.0,
    }
    assert got == pytest.approx(expected, abs=1e-4)
