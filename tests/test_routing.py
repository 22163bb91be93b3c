"""Downstream of the gate: the detection direction, per-head directional ablation (against a plain
one-head-one-pair loop and on the planted gate), the knockout cascade (planted gate) and the
dose-response."""
import numpy as np
import pandas as pd
import pytest
import torch

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
    m = load_model("tiny-gemma2")
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
        sens, ctrl = G.head_dla_pairs(tiny_model, gp, batch_size=3, fwd_hooks=R._zero_head(*head))
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
    df = R.knockout_cascade(model, gp, GATE, dla, k=3, n_random=4, window=2, progress=False)
    gate_rows = df[df.kind == "gate"]
    assert set(gate_rows.amplifier) == {f"L{l}H{h}" for l, h in AMPS}
    assert gate_rows.suppressed.all() and (gate_rows.change_pct < -50).all()
    rand = df[df.kind == "random"]
    assert rand.knocked.nunique() == 4 and f"L{GATE[0]}H{GATE[1]}" not in set(rand.knocked)
    assert not set(rand.knocked) & {f"L{l}H{h}" for l, h in AMPS}
    assert rand.change_pct.abs().max() < 1.0                        # the other heads are silent
    summary = R.cascade_summary(df)
    assert summary["suppressed"] == 3 and summary["gate_change_pct"] > 50 > summary["random_mean_pct"]
    assert summary["p_random_ge_gate"] == pytest.approx(1 / 5)


def test_cascade_summary_on_known_numbers():
    df = pd.DataFrame({"knocked": ["g", "g", "r1", "r1", "r2", "r2"], "kind": ["gate"] * 2 + ["random"] * 4,
                       "amplifier": ["a", "b"] * 3, "normal": [2.0, -1.0] * 3,
                       "knockout": [1.0, -0.5, 2.2, -1.0, 2.0, -0.9]})   # b: -1 -> -0.5 is suppressed too
    df["change_pct"] = 100 * (df.knockout - df.normal) / df.normal.abs()
    df["suppressed"] = np.sign(df.normal) * (df.knockout - df.normal) < 0
    s = R.cascade_summary(df)
    assert s["gate_change_pct"] == pytest.approx(50.0)             # mean(|-50|, |+50|)
    assert s["suppressed"] == 2 and s["suppression_range_pct"] == pytest.approx((50.0, 50.0))
    assert s["random_mean_pct"] == pytest.approx((5.0 + 5.0) / 2)
    assert s["random_sd_pct"] == pytest.approx(0.0)
    assert s["p_random_ge_gate"] == pytest.approx(1 / 3)


def test_amplifiers_and_null_heads():
    dla = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2], "head": [0, 1] * 3, "dla": [9.0, 1.0, 0.5, -3.0, 2.0, 0.1]})
    assert R.amplifiers_of(dla, (0, 0), k=2) == [(1, 1), (2, 0)]
    with pytest.raises(ValueError, match="last layer"):
        R.amplifiers_of(dla, (2, 0))


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
    with pytest.raises(ValueError, match="fractions"):
        R.dose_response(tiny_llama, gp, det, fractions=(-1.0,))
