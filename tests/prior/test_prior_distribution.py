"""Our prior against the reference prior (tabicl 0.1.4) on nine task statistics.

The reference side is the committed fixture tests/fixtures/prior_reference_stats.json
(600 i.i.d. reference tasks, written by tools/make_prior_fixture.py). Ours is generated
live. The default test uses 200 tasks and two MLP width buckets (fewer compiled
programs; buckets only pad, they do not change the distribution); the slow tests use
600 tasks at the default config and regenerate reference tasks live.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from locations import FIXTURES, TOOLS

from mllm_jax.prior import PriorConfig, sample_tasks
from mllm_jax.prior.sampler import compile_programs
from mllm_jax.prior.stats import (
    STATISTICS,
    ks_critical_value,
    ks_verdicts,
    task_statistics,
)

FIXTURE = FIXTURES / "prior_reference_stats.json"
ALPHA = 0.01  # each statistic's KS distance must stay within its critical value at this level


def _reference() -> dict:
    return json.loads(FIXTURE.read_text())


def _our_statistics(count: int, config: PriorConfig, seed: int = 0) -> dict[str, list[float]]:
    compile_programs(seed, 0, count, config)  # kinds compile in parallel threads
    batch = sample_tasks(seed, 0, count, config)
    assert batch.valid.all()
    tasks = batch.to_tasks()
    # scikit-learn's forest fitting releases the GIL: two threads use both cores.
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda t: task_statistics(t.X, t.y, t.n_train, t.categorical), tasks))
    return {name: [row[name] for row in rows] for name in STATISTICS}


def test_fixture_describes_the_reference_settings():
    ref = _reference()
    assert ref["reference"] == "tabicl==0.1.4"
    s = ref["settings"]
    defaults = PriorConfig()
    assert (s["min_features"], s["max_features"]) == (defaults.min_features, defaults.max_features)
    assert (s["max_classes"], s["rows"]) == (defaults.max_classes, defaults.rows)
    assert s["batch_size_per_gp"] == 1 and s["prior_type"] == "mix_scm"
    assert all(len(ref["statistics"][name]) == s["count"] >= 500 for name in STATISTICS)


def test_task_statistics_on_a_hand_made_task():
    """Each statistic against an independent computation (pandas, scipy) on a small task
    with a constant column, a two-valued column and a skewed one."""
    import pandas as pd
    from scipy import stats as sps

    rng = np.random.default_rng(0)
    rows, n_train = 40, 30
    X = np.stack(
        [np.full(rows, 3.0), rng.integers(0, 2, rows).astype(float), rng.exponential(size=rows)],
        axis=1,
    )
    y = np.array([0] * 10 + [1] * 30)
    got = task_statistics(X, y, n_train, np.array([False, True, False]), rf=False)
    frame = pd.DataFrame(X)
    p = np.array([10, 30]) / 40
    assert got["n_classes"] == 2
    assert got["class_entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(2))
    assert got["n_features"] == 3 and got["train_fraction"] == pytest.approx(0.75)
    assert got["categorical_fraction"] == pytest.approx(1 / 3)
    skews = [0.0, abs(sps.skew(X[:, 1])), abs(sps.skew(X[:, 2]))]
    assert got["feature_abs_skewness"] == pytest.approx(np.median(skews))
    assert got["feature_distinct_fraction"] == pytest.approx(frame.nunique().mean() / rows)
    corr = frame.iloc[:, 1:].corrwith(pd.Series(y, dtype=float)).abs()
    assert got["mean_abs_label_corr"] == pytest.approx((0.0 + corr.sum()) / 3)
    assert "rf_accuracy" not in got


def test_ks_critical_value_matches_scipy():
    """At the critical value, scipy's asymptotic two-sample KS p-value is alpha."""
    from scipy.special import kolmogorov

    for n, m in ((200, 600), (600, 600), (50, 80)):
        critical = ks_critical_value(n, m, ALPHA)
        effective = np.sqrt(n * m / (n + m))
        assert kolmogorov(critical * effective) == pytest.approx(ALPHA, rel=1e-3)
    assert ks_critical_value(200, 600) == pytest.approx(0.1329, abs=1e-4)
    with pytest.raises(ValueError):
        ks_critical_value(0, 10)


def test_matches_reference_statistics():
    config = PriorConfig(widths=(128, 512))
    verdicts = ks_verdicts(_our_statistics(200, config), _reference()["statistics"], ALPHA)
    assert set(verdicts) == set(STATISTICS)
    assert all(v["within"] for v in verdicts.values()), verdicts


@pytest.mark.slow
def test_matches_reference_statistics_600_tasks():
    """The numbers in docs/prior.md: 600 tasks, default config."""
    verdicts = ks_verdicts(_our_statistics(600, PriorConfig()), _reference()["statistics"], ALPHA)
    assert set(verdicts) == set(STATISTICS)
    assert all(v["within"] for v in verdicts.values()), verdicts


@pytest.mark.slow
def test_reference_fixture_regenerates():
    """The fixture's first tasks come out of the installed reference again, statistic by
    statistic (same script, seed and order), so the fixture is what tabicl produces."""
    pytest.importorskip("tabicl")
    sys.path.insert(0, str(TOOLS))
    try:
        import make_prior_fixture
    finally:
        sys.path.remove(str(TOOLS))
    ref = _reference()
    count = 40
    live: dict[str, list[float]] = {name: [] for name in STATISTICS}
    families = []
    for X, y, n_train, cat, params in make_prior_fixture.sample_reference(
        count, ref["settings"]["seed"]
    ):
        for name, value in task_statistics(X, y, n_train, cat).items():
            live[name].append(value)
        families.append("mlp" if params["prior_type"] == "mlp_scm" else "tree")
    assert families == ref["info"]["family"][:count]
    for name in STATISTICS:
        np.testing.assert_allclose(
            live[name], ref["statistics"][name][:count], atol=2e-6, err_msg=name
        )
