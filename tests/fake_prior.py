"""A cheap stand-in for the prior (`generate(..., batches=fake_batches)`), a small filter
and a corpus reader, shared by the corpus tests and the tools' tests."""

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from mllm_jax.data.shards import list_corpus_shards
from mllm_jax.filtering import FilterConfig
from mllm_jax.prior.batch import TaskBatch

ROWS, FEATURES, N_TRAIN = 60, 4, 40


def fake_batches(seed, start, count, prior, batch_size, *, devices=None):
    """Task i: learnable labels (x0 > 0) when i is even, coin flips when odd; every index
    equal to 3 mod 7 is invalid. A pure function of (seed, i), like the prior."""
    for lo in range(start, start + count, batch_size):
        n = min(batch_size, start + count - lo)
        X = np.zeros((n, ROWS, FEATURES), np.float32)
        y = np.zeros((n, ROWS), np.int32)
        for k in range(n):
            i = lo + k
            rng = np.random.default_rng([seed, i])
            X[k] = rng.normal(size=(ROWS, FEATURES))
            learnable = (X[k, :, 0] > 0).astype(np.int32)
            y[k] = learnable if i % 2 == 0 else rng.integers(0, 2, ROWS)
        valid = (np.arange(lo, lo + n) % 7) != 3
        yield TaskBatch(
            X=X * valid[:, None, None],
            y=y,
            n_features=np.full(n, FEATURES, np.int32),
            n_classes=np.full(n, 2, np.int32),
            n_train=np.full(n, N_TRAIN, np.int32),
            categorical=np.zeros((n, FEATURES), bool),
            family=np.array(["mlp"] * n),
            valid=valid,
            seed=seed,
            start=lo,
        )


FILTER = FilterConfig(n_estimators=5, consensus=True, consensus_folds=3)


def records(directory) -> list[bytes]:
    out = []
    for path in list_corpus_shards(directory):
        reader = ArrayRecordReader(str(path))
        out.extend(reader.read_all())
        reader.close()
    return out


def stops_after(batches_before_stop: int, error: type[BaseException] = KeyboardInterrupt):
    """The stand-in prior, raising `error` after `batches_before_stop` batches."""

    def interrupted(*args, **kwargs):
        batches = fake_batches(*args, **kwargs)
        for _ in range(batches_before_stop):
            yield next(batches)
        raise error

    return interrupted
