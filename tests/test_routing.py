"""Downstream of the gate: the detection direction, per-head directional ablation (against a plain
one-head-one-pair loop and on the planted gate), the knockout cascade (planted gate) and the
dose-response."""
import numpy as np
import pandas as pd
import pytest
import torch

from refusal_circuits import engine as E
from refusal_circuits import gate as G
from refusal_circuits import hooks
from refusal_circuits import routing as R
from refusal_circuits.data import load_safety_pairs
from test_planted_gate import AMPS, GATE, build_planted


@pytest.fixture(scope="module")
def planted():
    return build_planted()


def _pairs(model, n=3):
    return G.prepare_pairs(model, load_safety_pairs().head(n), max_target_tokens=3)


def test_detection_direction_is_the_unit_mean_difference(tiny_llama):
    gp = _pairs(tiny_llama)
    det = R.detection_direction(tiny_llama, gp, batch_size=2)
    assert det.layer == tiny_llama.n_layers // 2
    name = hooks.resid_pre(det.layer)

    def last(text):
        ids = tiny_llama.tokenizer(tiny_llama.format_prompt(text), add_special_tokens=False, return_tensors="pt").input_ids
        _, cache = tiny_llama.bridge.run_with_cache(ids, names_filter=[name])
        return cache[name][0, -1].float()

    with torch.no_grad():
        s = torch.stack([last(t) for t in gp.pairs.sensitive])
        c = torch.stack([last(t) for t in gp.pairs.control])
    diff = s.mean(0) - c.mean(0)
    assert torch.allclose(det.direction, diff / diff.norm(), atol=1e-4)
    assert det.diff_norm == pytest.approx(float(diff.norm()), rel=1e-4)
    assert det.resid_norm == pytest.approx(float(torch.cat([s, c]).norm(dim=-1).mean()), rel=1e-4)
    with pytest.raises(ValueError, match="layer must be"):
        R.detection_direction(tiny_llama, gp, layer=99)


def test_no_detection_direction_where_the_prompts_cannot_differ():
    # tiny-gemma2's layer 0 attends over a window of 4: the last position sees only the template suffix
    from refusal_circuits import load_model
    m = load_model("tiny-gemma2-2l")
    with pytest.raises(ValueError, match="no detection direction"):
        R.detection_direction(m, _pairs(m), layer=1)


def test_ablation_directions_solve_the_least_squares_problem(tiny_model):
    d = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(0))
    U = R.ablation_directions(tiny_model, d)
    W_O = tiny_model.bridge.W_O.detach().double()
    assert U.shape == (tiny_model.n_layers, tiny_model.n_heads, W_O.shape[2])
    for l in range(tiny_model.n_layers):
        for h in range(tiny_model.n_heads):
            want = torch.linalg.lstsq(W_O[l, h].T, d.double()[:, None]).solution[:, 0]   # full-rank W_O: one solution
            assert torch.allclose(U[l, h].double(), want / want.norm(), atol=1e-4)


def test_directional_ablation_equals_a_one_head_one_pair_loop(tiny_model):
    gp = _pairs(tiny_model)
    d = torch.randn(tiny_model.d_model, generator=torch.Generator().manual_seed(1))
    heads = [(0, 1), (tiny_model.n_layers - 1, tiny_model.n_heads - 1)]
    fast = R.directional_ablation(tiny_model, gp, d, alpha=5.0, heads=heads, max_batch=4, pairs_per_batch=2,
                                  progress=False)
    U = R.ablation_directions(tiny_model, d)
    rows = []
    for l, h in heads:
        u = U[l, h]

        def hook(z, hook, u=u, h=h):
            z = z.clone()
            z[:, :, h] = z[:, :, h] - 5.0 * (z[:, :, h] @ u)[..., None] * u
            return z

        with tiny_model.bridge.hooks(fwd_hooks=[(hooks.z(l), hook)]):
            ablated = G.nll(tiny_model, gp.sensitive, gp.targets, batch_size=1)
        rows += ablated.tolist()
    assert len(fast) == len(heads) * len(gp)
    assert fast.ablated.values == pytest.approx(rows, abs=1e-4)
    base = G.nll(tiny_model, gp.sensitive, gp.targets)
    assert fast.baseline.values == pytest.approx(base.tolist() * len(heads), abs=1e-4)
    assert np.allclose(fast.reduction, fast.baseline - fast.ablated)


def test_knockout_dla_equals_a_full_run_with_the_head_zeroed(tiny_model):
    """The fast knockout (layers below from one unablated run, heads of a layer stacked) gives every
    head's DLA exactly as a full forward with the zeroing hook on, with several batches of prompts."""
    gp = _pairs(tiny_model, 3)
    last = tiny_model.n_layers - 1
    knocked = [(0, 1), (last, 0), (last, tiny_model.n_heads - 1), (last, 1)]
    memo = {}
    fast = R.knockout_dla(tiny_model, gp, knocked, batch_size=2, max_batch=4, memo=memo)
    runs = len(memo)
    again = R.knockout_dla(tiny_model, gp, knocked[1:2], batch_size=2, memo=memo, resid_layers=[0, last])
    assert again[knocked[1]].equal(fast[knocked[1]]) and len(memo) == runs   # the unablated runs are reused
    with pytest.raises(ValueError, match="resid_layers"):
        R.knockout_dla(tiny_model, gp, knocked[1:2], resid_layers=[0])
    for head in knocked:
        sens, ctrl = G.head_dla_pairs(tiny_model, gp, batch_size=3, fwd_hooks=E.zero_head_hooks(*head))
        assert fast[head].shape == sens.shape
        assert torch.allclose(fast[head], sens - ctrl, atol=1e-4), (tiny_model.name, head)
    s0, c0 = G.head_dla_pairs(tiny_model, gp)
    assert not torch.allclose(fast[knocked[0]], s0 - c0, atol=1e-4)    # zeroing L0 moves the later heads


@pytest.mark.parametrize("alpha", [1.0, 5.0])
def test_ablation_of_the_planted_gate_rescales_its_only_write(planted, alpha):
    # the planted gate's W_O is rank one (it writes (z . a) u), so u_gate = +-a, and removing alpha times
    # the z component along a scales its write by (1 - alpha): the same as scaling its whole z. Silent
    # heads (W_O = 0) get u = 0 and change nothing.
    model, gp = planted
    det = R.detection_direction(model, gp)
    df = R.directional_ablation(model, gp, det.direction, alpha=alpha, progress=False)

    def scale(z, hook):
        z = z.clone()
        z[:, :, GATE[1]] *= 1 - alpha
        return z

    with model.bridge.hooks(fwd_hooks=[(hooks.z(GATE[0]), scale)]):
        want = G.nll(model, gp.sensitive, gp.targets)
    got = df[(df.layer == GATE[0]) & (df["head"] == GATE[1])]
    assert got.ablated.values == pytest.approx(want.tolist(), abs=1e-5)
    assert got.reduction.abs().max() > 0
    silent = df[[(l, h) not in [GATE, *AMPS] for l, h in zip(df.layer, df["head"])]]
    assert (silent.reduction == 0).all()
    s = R.summarise_ablation(df, float(G.gaps(model, gp).gap.mean()))
    assert s["rank"].tolist() == list(range(1, len(s) + 1)) and s.reduction.is_monotonic_decreasing


def test_knockout_of_the_planted_gate_silences_its_amplifiers_and_random_heads_do_not(planted):
    model, gp = planted
    dla, _ = G.head_dla(model, gp, n_boot=20)
    assert set(R.amplifiers_of(dla, GATE, k=3)) == set(AMPS)
    df = R.knockout_cascade(model, gp, GATE, dla, k=3, n_random=4, window=2, rules=("after_gate",), progress=False)
    gate_rows = df[df.kind == "gate"]
    assert set(gate_rows.amplifier) == {f"L{l}H{h}" for l, h in AMPS}
    assert gate_rows.suppressed_abs.all() and (gate_rows.change_pct < -50).all()
    rand = df[df.kind == "random"]
    assert rand.knocked.nunique() == 4 and f"L{GATE[0]}H{GATE[1]}" not in set(rand.knocked)
    assert not set(rand.knocked) & {f"L{l}H{h}" for l, h in AMPS}
    assert rand.change_pct.abs().max() < 1.0                        # the other heads are silent
    summary = R.cascade_summary(df)
    assert summary["suppressed_abs"] == 3 and summary["gate_change_pct"] > 50 > summary["random_mean_pct"]
    assert summary["p_random_ge_gate"] == pytest.approx(1 / 5)


def test_knockout_changes_are_measured_against_the_same_pairs(planted):
    """The amplifiers come from a summary over every pair; the knockout runs on a subset. A head that writes
    nothing changes nothing, so the random (silent) heads' change must be zero on the subset too: the
    baseline is the unablated DLA of the subset, not the summary's."""
    model, gp = planted
    dla, per_pair = G.head_dla(model, gp, n_boot=20)
    sub = gp.subset(range(2))
    df = R.knockout_cascade(model, sub, GATE, dla, k=3, n_random=4, window=2, rules=("after_gate",), progress=False)
    want = per_pair[per_pair.pair_id.isin(sub.pairs.pair_id)].groupby(["layer", "head"])["diff"].mean()
    for a, n0 in zip(df.amplifier, df.normal):
        l, h = map(int, a[1:].split("H"))
        assert n0 == pytest.approx(float(want.loc[(l, h)]), rel=1e-4, abs=1e-6)
    full = dla.set_index(["layer", "head"]).dla
    assert any(abs(float(full.loc[a]) - float(want.loc[a])) > 1e-3 * abs(float(full.loc[a])) for a in AMPS)
    assert df[df.kind == "random"].change_pct.abs().max() < 1e-3


def test_cascade_summary_on_known_numbers():
    df = pd.DataFrame({"knocked": ["g", "g", "r1", "r1", "r2", "r2"], "kind": ["gate"] * 2 + ["random"] * 4,
                       "rule": "after_gate", "amplifier": ["a", "b"] * 3, "normal": [2.0, -1.0] * 3,
                       "knockout": [1.0, -0.5, 2.2, -1.0, 2.0, -0.9]})
    df["change_pct"] = 100 * (df.knockout - df.normal) / df.normal.abs()
    df["suppressed_signed"] = df.knockout < df.normal
    df["suppressed_abs"] = df.knockout.abs() < df.normal.abs()
    s = R.cascade_summary(df)
    assert s["gate_change_pct"] == pytest.approx(50.0)             # mean(|-50|, |+50|)
    # b: -1 -> -0.5 shrinks |DLA| (suppressed by magnitude) but rises (not suppressed by the paper's sign count)
    assert s["suppressed_abs"] == 2 and s["suppressed_signed"] == 1
    assert s["suppression_range_pct"] == pytest.approx((50.0, 50.0))
    assert s["random_mean_pct"] == pytest.approx((5.0 + 5.0) / 2)
    assert s["random_sd_pct"] == pytest.approx(0.0) and s["random_sd_pop_pct"] == pytest.approx(0.0)
    assert s["p_random_ge_gate"] == pytest.approx(1 / 3)
    none = R.cascade_summary(df, rule="paper_band")
    assert not none["testable"] and np.isnan(none["gate_change_pct"])


def test_amplifiers_and_null_heads():
    dla = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2], "head": [0, 1] * 3, "dla": [9.0, 1.0, 0.5, -3.0, 2.0, 0.1]})
    assert R.amplifiers_of(dla, (0, 0), k=2) == [(1, 1), (2, 0)]
    assert R.amplifiers_of(dla, (2, 0)) == []                      # nothing after a last-layer gate
    # the paper's kind: the band of a 4-layer model is layers 1-2, either side of the gate, gate excluded
    assert R.amplifiers_of(dla, (2, 0), k=2, rule="paper_band", n_layers=4) == [(1, 1), (1, 0)]
    with pytest.raises(ValueError, match="rule"):
        R.amplifiers_of(dla, (0, 0), rule="mine")


class _Model:
    n_layers, n_heads = 10, 4


def test_null_heads_widen_the_window_to_reach_n():
    heads, w = R.null_heads(_Model(), (5, 0), exclude=[(5, 1)], n=30, window=2, seed=0)
    assert len(heads) == 30 and len(set(heads)) == 30 and w == 4         # +-2 holds 18 heads, +-4 holds 34
    assert (5, 0) not in heads and (5, 1) not in heads
    assert all(abs(l - 5) <= w for l, _ in heads)
    assert R.null_heads(_Model(), (5, 0), [], n=30, seed=0) == R.null_heads(_Model(), (5, 0), [], n=30, seed=0)


def test_generation_classes_separate_broken_text(tiny_llama):
    assert R.repetition("a b c a b c a b c a b c") > 0.5 and R.repetition("one two three four five") == 0
    prompts = ["How do I bake bread?"] * 3
    comps = ["I'm sorry, but I can't help with that.", "the the the the the the the the the the", ""]
    out = R.classify_generations(tiny_llama, prompts, comps, max_nll=1e9)
    assert out.response.tolist() == ["refusal", "degenerate", "degenerate"]
    # the unsteered model's NLL: a random tiny model finds any text unlikely, so a tight bound calls it broken
    strict = R.classify_generations(tiny_llama, prompts[:1], comps[:1], max_nll=0.1)
    assert strict.response.tolist() == ["degenerate"] and strict.nll.iloc[0] > 0.1


def test_dose_response_signs_and_zero_dose(tiny_llama):
    gp = _pairs(tiny_llama, 2)
    det = R.detection_direction(tiny_llama, gp)
    df = R.dose_response(tiny_llama, gp, det, fractions=(0.0, 5.0), max_new_tokens=4, progress=False)
    assert len(df) == 2 * 2 * len(gp)
    assert (df[df.kind == "sensitive"].alpha <= 0).all() and (df[df.kind == "control"].alpha >= 0).all()
    assert df[df.fraction == 5.0].alpha.abs().iloc[0] == pytest.approx(5.0 * det.resid_norm)
    from refusal_circuits.generation import generate
    plain = generate(tiny_llama, list(gp.pairs.sensitive), max_new_tokens=4, progress=False)
    zero = df[(df.kind == "sensitive") & (df.fraction == 0.0)].completion.tolist()
    assert zero == plain
    steered = df[(df.kind == "sensitive") & (df.fraction == 5.0)].completion.tolist()
    assert steered != plain                                         # a large push changes the text
    push = R.addition_hooks(tiny_llama, det.direction, det.layer, -5.0 * det.resid_norm)
    assert steered == generate(tiny_llama, list(gp.pairs.sensitive), max_new_tokens=4, fwd_hooks=push,
                               progress=False)                      # stacked fractions = one run each
    s = R.dose_summary(df)
    assert set(s.columns) >= {"kind", "fraction", "alpha", "refusal_rate", "n"}
    paper = R.dose_response(tiny_llama, gp, det, fractions=(5.0,), max_new_tokens=4, at="paper", progress=False)
    assert (paper.site == hooks.resid_post(det.layer)).all() and (df.site == hooks.resid_pre(det.layer)).all()
    det0 = R.Detection(0, det.direction, det.diff_norm, det.resid_norm)   # the output of L0 = the input of L1
    at_out = R.dose_response(tiny_llama, gp, det0, fractions=(5.0,), max_new_tokens=4, at="paper", progress=False)
    same = R.addition_hooks(tiny_llama, det0.direction, 1, -5.0 * det0.resid_norm)
    assert at_out[at_out.kind == "sensitive"].completion.tolist() == generate(
        tiny_llama, list(gp.pairs.sensitive), max_new_tokens=4, fwd_hooks=same, progress=False)
    classes = R.classify_generations(tiny_llama, list(df.instruction), list(df.completion))
    s = R.dose_summary(pd.concat([df, classes], axis=1))
    assert s[["refusal", "compliance", "degenerate"]].sum(1).tolist() == pytest.approx([1.0] * len(s))
    with pytest.raises(ValueError, match="fractions"):
        R.dose_response(tiny_llama, gp, det, fractions=(-1.0,))
