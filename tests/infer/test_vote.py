"""The reference vote against a transcription of MachineLearningLM's rule
(src/evaluation/result_proc/eval_layer_4.py: `_smart_voting` with weighted=True and
`_weighted_vote_single_position`; the probability is eval_layer_3's
`_extract_positive_class_prob`: P(label 1), else 1 - P(label 0))."""

from collections import Counter, defaultdict

import numpy as np
import pytest

from mllm_jax.infer.vote import reference_vote


def _reference_rule(predictions_with_tags, probabilities_with_tags):
    """The reference's loop, per position, as written there (ints for labels)."""
    final = []
    for i in range(min(len(p) for p in predictions_with_tags)):
        real_votes, real_probs, default_votes = [], [], []
        for voter in range(len(predictions_with_tags)):
            pred, tag = predictions_with_tags[voter][i]
            prob, _ = probabilities_with_tags[voter][i]
            if tag == "parser_success":
                real_votes.append(pred)
                real_probs.append(prob)
            else:
                default_votes.append(pred)
        if not real_votes:
            final.append(int(Counter(default_votes).most_common(1)[0][0]))
            continue
        weighted = defaultdict(float)
        for vote, prob in zip(real_votes, real_probs, strict=True):
            weighted[vote] += abs(prob - 0.5) * 2
        final.append(int(max(weighted, key=weighted.get)))
    return final


def test_a_hand_computed_case():
    # Row 0: member A says 0 with p1 = 0.1 (weight 0.8), B says 1 with p1 = 0.7 (0.4): 0.
    # Row 1: A unread, B says 2 (p1 = 0.2, weight 0.6): 2.
    # Row 2: both unread: the most common fallback, A's on a tie: 1.
    # Row 3: A's probabilities tie between 1 and 2 (its label: 1, the first) and B says
    # 0; both p1 = 0.5, weight 0 each: the first voter's label wins, 1.
    a = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1], [0.0, 0.5, 0.5]])
    b = np.array([[0.3, 0.7, 0.0], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.5, 0.5, 0.0]])
    read = [np.array([True, False, False, True]), np.array([True, True, False, True])]
    assert reference_vote([a, b], read).tolist() == [0, 2, 1, 1]


@pytest.mark.parametrize("members", [2, 3])
def test_equals_the_reference_rule_on_random_answers(members):
    rng = np.random.default_rng(members)
    n, k = 400, 4
    probas = [rng.dirichlet(np.ones(k) * 0.7, size=n) for _ in range(members)]
    # Ties in weight: some rows where every member has p1 = 0.5 exactly.
    for p in probas:
        p[:40] = [0.25, 0.5, 0.25, 0.0]
        p[40:60] = [0.0, 0.5, 0.5, 0.0]  # argmax -> 1
    read = [rng.random(n) < 0.8 for _ in range(members)]
    labels = [np.argmax(p, axis=1) for p in probas]
    preds = [[(int(lab[i]), "parser_success" if r[i] else "default") for i in range(n)]
             for lab, r in zip(labels, read, strict=True)]  # fmt: skip
    probs = [[(float(p[i, 1]), None) for i in range(n)] for p in probas]
    assert reference_vote(probas, read).tolist() == _reference_rule(preds, probs)


def test_needs_one_mask_per_member():
    with pytest.raises(ValueError, match="one read mask per member"):
        reference_vote([np.ones((2, 2)) / 2], [])
