"""Statistics with known answers: bootstrap intervals, sign-flip and family-wise tests, top-set stability,
the gate's margin."""
import itertools

import numpy as np
import pytest

from refusal_circuits import stats


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(1.0, 1.0, 20), rng.normal(1.0, 1.0, 2000)
    est, lo, hi = stats.bootstrap(np.mean, small, n_boot=500)
    assert lo < est < hi and est == pytest.approx(small.mean())
    _, lo2, hi2 = stats.bootstrap(np.mean, large, n_boot=500)
    assert lo2 < 1.0 < hi2 and (hi2 - lo2) < (hi - lo) / 5
    with pytest.raises(ValueError, match="empty"):
        stats.resample_indices(0, 10)


def test_familywise_p_equals_the_exact_max_statistic_on_a_small_sample():
    # 4 pairs: all 16 sign patterns enumerated give the exact max-T p; the sampled one must be close
    X = np.array([[1.0, 1.2, 0.9, 1.1], [0.2, -0.1, 0.3, -0.2], [-1.0, -0.8, -1.2, -0.9]])
    obs = X.mean(1)
    pats = np.array(list(itertools.product([-1, 1], repeat=4)), dtype=float)
    mx = (pats @ X.T / 4).max(1)
    exact = np.array([(mx >= o).mean() for o in obs])
    got = stats.familywise_p(X, n=20_000, seed=1)
    assert got == pytest.approx(exact, abs=0.01)
    # the correction never makes a head look better than its own sign-flip test
    assert got[1] >= stats.sign_flip_p(X[1], n=20_000, seed=1) - 0.01


def test_familywise_p_finds_a_planted_head_and_not_the_noise():
    rng = np.random.default_rng(3)
    X = rng.normal(0, 1, (50, 48))
    X[7] += 1.5
    p = stats.familywise_p(X, n=5000, seed=0)
    assert p[7] < 0.001 and (np.delete(p, 7) > 0.05).all()
    assert p.min() >= 1 / 5001


def test_top_set_stability_and_margin():
    rng = np.random.default_rng(0)
    clear = np.vstack([rng.normal(m, 0.1, 30) for m in (5, 4, 3, 0, 0, 0)])
    s = stats.top_set_stability(clear, k=3, n_boot=300)
    assert s["jaccard_mean"] == 1.0 and s["identical_share"] == 1.0 and s["first_share"] == 1.0
    tied = np.vstack([rng.normal(1, 1, 30) for _ in range(6)])
    assert stats.top_set_stability(tied, k=3, n_boot=300)["jaccard_mean"] < 0.8
    assert stats.margin_ci(clear[0], clear[1], n_boot=300)["stands_out"]
    m = stats.margin_ci(tied[0], tied[1], n_boot=300)
    assert m["lo"] < 0 < m["hi"] and not m["stands_out"]      # two heads drawn from one distribution
    d = stats.margin_ci(clear[0], clear[1], n_boot=300, denominator=np.full(30, 2.0))
    assert d["margin"] == pytest.approx((clear[0].mean() - clear[1].mean()) / 2)


def test_fisher_greater_matches_hand_computed_tails():
    from refusal_circuits.stats import fisher_greater

    # 3/3 vs 0/3: only the observed table is as extreme, 1 / C(6, 3)
    assert fisher_greater(3, 3, 0, 3) == pytest.approx(1 / 20)
    # Fisher's tea tasting, 3 of 4 vs 1 of 4: (C(4,3)C(4,1) + C(4,4)C(4,0)) / C(8,4) = 17/70
    assert fisher_greater(3, 4, 1, 4) == pytest.approx(17 / 70)
    # the other direction is not significant, equal rates are p = 1 at zero successes
    assert fisher_greater(0, 3, 3, 3) == pytest.approx(1.0) and fisher_greater(0, 24, 0, 24) == 1.0
    assert fisher_greater(20, 24, 2, 24) < 1e-6
    with pytest.raises(ValueError, match="0 <= k <= n"):
        fisher_greater(5, 4, 0, 4)


def test_gini_and_top_share_on_known_vectors():
    from refusal_circuits.stats import gini, top_share

    assert gini(np.ones(10)) == pytest.approx(0.0) and top_share(np.ones(10), 1) == pytest.approx(0.1)
    one = np.zeros(10)
    one[3] = -2.0  # |values|: the sign of a head's effect does not make it less of a carrier
    assert gini(one) == pytest.approx(0.9) and top_share(one, 1) == 1.0
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)  # (2*(1+4+9+16)/(4*10)) - 5/4
    assert np.isnan(gini(np.zeros(3))) and top_share([3, 1], 5) == 1.0


def test_concentration_separates_a_planted_sparse_gate_from_dense_routing():
    from refusal_circuits.stats import concentration

    rng = np.random.default_rng(0)
    dense = rng.normal(1.0, 0.3, size=(100, 40))
    sparse = rng.normal(0.0, 0.05, size=(100, 40))
    sparse[7] += 5.0
    d, s = concentration(dense, n_boot=300), concentration(sparse, n_boot=300)
    assert s["top1"][0] > 0.4 and d["top1"][0] < 0.05
    assert s["gini"][1] > d["gini"][2]  # the intervals do not overlap
    for name in ("top1", "top5", "top10", "gini"):
        est, lo, hi = s[name]
        assert lo <= hi and 0 <= est <= 1
    assert s["top1"][0] <= s["top5"][0] <= s["top10"][0]
    with pytest.raises(ValueError, match="unit, pair"):
        concentration(np.ones(5))


def test_strongest_ratio_finds_a_planted_weakening_and_not_a_null():
    from refusal_circuits.stats import strongest_ratio

    rng = np.random.default_rng(0)
    small = rng.normal(0, 0.05, size=(6, 40))
    small[2] += 1.0                                   # one strong head, mean reduction 1.0
    large = rng.normal(0, 0.05, size=(9, 30))
    large[7] += 0.1                                   # ten times weaker, on other pairs
    r = strongest_ratio(small, large, n_boot=500)
    assert r["ratio"] == pytest.approx(small.mean(1).max() / large.mean(1).max())
    assert 7 < r["lo"] <= r["ratio"] <= r["hi"] < 20
    same = strongest_ratio(small, small[:, ::-1].copy(), n_boot=500)
    assert same["lo"] < 1 < same["hi"]
    with pytest.raises(ValueError, match="unit, pair"):
        strongest_ratio(small[0], large)
