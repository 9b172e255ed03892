"""How the ensemble members' answers become one label per row.

`mean` (the default): the argmax of the members' averaged class probabilities.

`reference`: MachineLearningLM's evaluation vote (`src/evaluation/result_proc/
eval_layer_4.py`, `SmartVotingAggregationLayer._smart_voting` with `weighted=True`, its
default). Per row, only members whose label was read from their answer vote (in
generation mode a parsed JSON label; every scored label counts as read). Each vote
weighs `|p1 - 0.5| * 2`, with `p1` that member's probability of the label printed "1"
(the reference takes the binary AUC probability as the confidence, also for more than
two classes). The label with the largest summed weight wins; ties go to the label that
received its first vote earliest in member order (the reference's `max` over an
insertion-ordered dict). A row no member read gets the most common of the members'
fallback labels (ties: first in member order).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

VOTES = ("mean", "reference")


def reference_vote(probas: Sequence[np.ndarray], read: Sequence[np.ndarray]) -> np.ndarray:
    """i64[n] voted class codes.

    probas: per member, f64[n, K] class probabilities (columns are the printed labels
        0..K-1); each member's label is its row's argmax (the first on ties).
    read: per member, bool[n]: the label was read from the member's answer.
    """
    if len(probas) != len(read) or not probas:
        raise ValueError(f"need one read mask per member, got {len(probas)} and {len(read)}")
    labels = [np.argmax(p, axis=1) for p in probas]
    p1 = [p[:, 1] if p.shape[1] > 1 else np.zeros(len(p)) for p in probas]
    voted = np.empty(len(labels[0]), np.int64)
    for row in range(len(voted)):
        weights: dict[int, float] = {}
        fallback: list[int] = []
        for member in range(len(probas)):
            label = int(labels[member][row])
            if read[member][row]:
                weights[label] = weights.get(label, 0.0) + abs(float(p1[member][row]) - 0.5) * 2
            else:
                fallback.append(label)
        if weights:
            voted[row] = max(weights, key=weights.__getitem__)
        else:
            voted[row] = Counter(fallback).most_common(1)[0][0]
    return voted
