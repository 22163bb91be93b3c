"""Statistics over pairs, in one place: bootstrap resamples and percentile intervals, sign-flip
permutation tests (one head, and family-wise over many heads), the stability of a top set, and the
"stands out" test of the gate, and Fisher's exact test of two refusal rates.

Every function takes plain arrays (``[..., pair]``) and a ``seed``; the analyses (gate, routing,
cipher, patching) call these rather than writing their own resampling loops.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def resample_indices(n_items: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``[n_boot, n_items]`` bootstrap indices (with replacement), seeded."""
    if n_items < 1:
        raise ValueError("Cannot bootstrap an empty sample.")
    return np.random.default_rng(seed).integers(0, n_items, size=(n_boot, n_items))


def percentile_ci(boot: np.ndarray, level: float = 0.95, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The central ``level`` percentile interval of bootstrap values along ``axis`` (NaNs ignored)."""
    a = (1 - level) / 2
    lo, hi = np.nanquantile(boot, [a, 1 - a], axis=axis)
    return lo, hi


def bootstrap(stat: Callable[..., np.ndarray], *samples: np.ndarray, n_boot: int = 1000, seed: int = 0,
              level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample the pairs (last axis, shared by every sample) ``n_boot`` times and recompute
    ``stat(*samples_resampled)``: ``(estimate, lo, hi)``."""
    arrays = [np.asarray(s, dtype=float) for s in samples]
    idx = resample_indices(arrays[0].shape[-1], n_boot, seed)
    boot = np.stack([np.asarray(stat(*[a[..., i] for a in arrays]), dtype=float) for i in idx])
    lo, hi = percentile_ci(boot, level)
    return np.asarray(stat(*arrays), dtype=float), lo, hi


def sign_flip_p(effects: np.ndarray, n: int = 10_000, seed: int = 0) -> float:
    """One-sided sign-flip permutation test of ``mean(effects) > 0`` over pairs: the share of ``n``
    random sign flips (plus the observed one) whose mean is at least the observed mean."""
    x = np.asarray(effects, dtype=float)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n, len(x)))
    null = (signs * x).mean(1)
    return float((1 + (null >= x.mean()).sum()) / (n + 1))


def familywise_p(scores: np.ndarray, n: int = 10_000, seed: int = 0) -> np.ndarray:
    """Family-wise (max-T, Westfall--Young) sign-flip test over heads. ``scores [head, pair]`` are the
    per-pair scores (e.g. necessity + sufficiency as % of the gap); under the null each pair's scores
    are symmetric about zero, so one sign per pair is flipped for *every* head at once (keeping the
    heads' correlation). Adjusted p of head ``k`` = the share of the ``n`` flips (plus the observed one)
    whose *largest* head mean reaches head ``k``'s observed mean. The smallest p it can give is
    ``1 / (n + 1)``."""
    X = np.asarray(scores, dtype=float)
    obs = X.mean(1)
    rng = np.random.default_rng(seed)
    exceed = np.zeros(len(obs))
    for start in range(0, n, 1000):
        signs = rng.choice([-1.0, 1.0], size=(min(1000, n - start), X.shape[1]))
        mx = (signs @ X.T / X.shape[1]).max(1)                              # [draws]
        exceed += (mx[:, None] >= obs[None]).sum(0)
    return (1 + exceed) / (n + 1)


def top_set_stability(scores: np.ndarray, k: int = 5, n_boot: int = 2000, seed: int = 0,
                      denominator: np.ndarray | None = None) -> dict:
    """Bootstrap stability of the top-``k`` set of heads. ``scores [head, pair]``; each resample of the
    pairs ranks the heads by their mean score (divided by the resampled mean of ``denominator [pair]``,
    e.g. the NLL gap, when given) and compares its top ``k`` with the full sample's: mean Jaccard index,
    its 95% interval, the share of resamples with the identical set, and the share in which the full
    sample's first head is first again."""
    X = np.asarray(scores, dtype=float)
    k = min(int(k), X.shape[0])

    def ranked(cols) -> np.ndarray:
        m = X[:, cols].mean(1)
        if denominator is not None:
            m = m / np.asarray(denominator, dtype=float)[cols].mean()
        return np.argsort(-m, kind="stable")

    full = ranked(np.arange(X.shape[1]))
    top = set(full[:k].tolist())
    jac, first = [], 0
    for cols in resample_indices(X.shape[1], n_boot, seed):
        order = ranked(cols)
        t = set(order[:k].tolist())
        jac.append(len(t & top) / len(t | top))
        first += order[0] == full[0]
    jac = np.array(jac)
    lo, hi = percentile_ci(jac)
    return {"k": k, "n_boot": n_boot, "jaccard_mean": float(jac.mean()), "jaccard_lo": float(lo),
            "jaccard_hi": float(hi), "identical_share": float((jac == 1).mean()), "first_share": first / n_boot}


def margin_ci(first: np.ndarray, second: np.ndarray, n_boot: int = 2000, seed: int = 0,
              denominator: np.ndarray | None = None, level: float = 0.95) -> dict:
    """Does the first head stand out? The margin ``mean(first) - mean(second)`` over pairs (each divided
    by ``mean(denominator)`` when given), with a paired bootstrap interval; ``stands_out`` is true when
    the interval excludes zero (lower end above it)."""
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    d = None if denominator is None else np.asarray(denominator, dtype=float)

    def stat(x, y, *g):
        return (x.mean() - y.mean()) / (g[0].mean() if g else 1.0)

    est, lo, hi = bootstrap(stat, a, b, *([d] if d is not None else []), n_boot=n_boot, seed=seed, level=level)
    return {"margin": float(est), "lo": float(lo), "hi": float(hi), "stands_out": bool(lo > 0)}


def fisher_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided Fisher exact test that the first rate (``k1`` of ``n1``) exceeds the second (``k2`` of
    ``n2``): the probability, with the margins fixed, of at least ``k1`` successes in the first group
    (the hypergeometric upper tail)."""
    if not (0 <= k1 <= n1 and 0 <= k2 <= n2) or n1 < 1 or n2 < 1:
        raise ValueError(f"fisher_greater needs 0 <= k <= n and n >= 1, got {k1}/{n1} and {k2}/{n2}.")
    total, k = n1 + n2, k1 + k2
    denom = math.comb(total, k)
    tail = sum(math.comb(n1, i) * math.comb(n2, k - i) for i in range(k1, min(n1, k) + 1))
    return min(1.0, tail / denom)


def gini(values: np.ndarray) -> float:
    """The Gini coefficient of ``|values|``: 0 when every entry is equal, ``(n - 1) / n`` when one entry
    holds everything (NaN when all are zero)."""
    x = np.sort(np.abs(np.asarray(values, dtype=float)))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return float("nan")
    return float(2 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


def top_share(values: np.ndarray, k: int) -> float:
    """The share of ``sum |values|`` carried by the ``k`` largest ``|values|``."""
    x = np.sort(np.abs(np.asarray(values, dtype=float)))[::-1]
    total = x.sum()
    return float(x[:k].sum() / total) if total > 0 else float("nan")


def concentration(effects: np.ndarray, ks: tuple[int, ...] = (1, 5, 10), n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> dict[str, tuple[float, float, float]]:
    """How concentrated per-unit effects are: from ``effects [unit, pair]`` the per-unit mean over pairs,
    then the share of the total ``|mean|`` held by the top ``k`` units (``top<k>``, re-ranked in every
    resample) and the Gini coefficient, each as ``(estimate, lo, hi)`` with a bootstrap over pairs."""
    E = np.asarray(effects, dtype=float)
    if E.ndim != 2 or E.shape[0] < 1:
        raise ValueError(f"concentration needs effects shaped [unit, pair], got shape {E.shape}.")

    def stat(x):
        m = x.mean(-1)
        return np.array([top_share(m, k) for k in ks] + [gini(m)])

    est, lo, hi = bootstrap(stat, E, n_boot=n_boot, seed=seed, level=level)
    names = [f"top{k}" for k in ks] + ["gini"]
    return {n: (float(e), float(a), float(b)) for n, e, a, b in zip(names, est, lo, hi)}


def strongest_ratio(small: np.ndarray, large: np.ndarray, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """How much weaker the strongest unit of ``large`` is than that of ``small``: from per-unit effects
    shaped ``[unit, pair]`` (two independent samples: pairs need not match), the ratio
    ``max_u mean(small[u]) / max_u mean(large[u])``. The strongest unit is re-chosen in every resample, and
    the two samples' pairs are resampled independently. Returns ``ratio, lo, hi`` and both maxima."""
    S, L = np.asarray(small, dtype=float), np.asarray(large, dtype=float)
    if S.ndim != 2 or L.ndim != 2 or min(S.shape) < 1 or min(L.shape) < 1:
        raise ValueError(f"strongest_ratio needs two non-empty [unit, pair] arrays, got {S.shape} and {L.shape}.")
    top_s, top_l = S.mean(-1).max(), L.mean(-1).max()
    bs = S[:, resample_indices(S.shape[1], n_boot, seed)].mean(-1).max(0)        # [n_boot]
    bl = L[:, resample_indices(L.shape[1], n_boot, seed + 1)].mean(-1).max(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = percentile_ci(bs / bl, level)
        ratio = top_s / top_l
    return {"ratio": float(ratio), "lo": float(lo), "hi": float(hi), "small": float(top_s), "large": float(top_l)}
