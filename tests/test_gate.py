"""The gate: NLL metric, position alignment of pairs of different lengths, the exact batched interchange
against the paper's one-forward-per-head-per-pair procedure, the gate and its statistics."""
import numpy as np
import pandas as pd
import pytest
import torch

from refusal_circuits import gate as G
from refusal_circuits.data import load_safety_pairs
from refusal_circuits.results import ResultsStore


@pytest.fixture(scope="module")
def llama_pairs(tiny_llama):
    return G.prepare_pairs(tiny_llama, load_safety_pairs().head(3), max_target_tokens=3)


def test_position_map_end_and_start():
    # target run of 5 real tokens in a width-6 batch, source of 3 real tokens in width 4
    mask, src = G.position_map([5], [3], 6, 4, "end")
    assert mask[0].tolist() == [False, False, False, True, True, True]
    assert src[0, 3:].tolist() == [1, 2, 3]                      # last three line up with the source's last three
    mask, src = G.position_map([5], [3], 6, 4, "start")
    assert mask[0].tolist() == [False, True, True, True, False, False]
    assert src[0, 1:4].tolist() == [1, 2, 3]                     # the source's first tokens on the target's first
    # a longer source: "start" overwrites the target's last positions, extra source positions are dropped
    mask, src = G.position_map([3], [5], 3, 5, "start")
    assert mask[0].tolist() == [True, True, True] and src[0].tolist() == [0, 1, 2]
    mask, src = G.position_map([3], [5], 3, 5, "end")
    assert mask[0].tolist() == [True, True, True] and src[0].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="align"):
        G.position_map([3], [3], 3, 3, "middle")


def test_targets_are_the_controls_greedy_reply_without_special_tokens(tiny_llama, llama_pairs):
    gp = llama_pairs
    special = set(tiny_llama.tokenizer.all_special_ids)
    assert len(gp) == 3 and all(1 <= len(t) <= 3 for t in gp.targets)
    assert not any(set(t.tolist()) & special for t in gp.targets)
    assert gp.pairs.n_sensitive.tolist() == [len(s) for s in gp.sensitive]
    ids, mask = tiny_llama.to_tokens([gp.pairs.control[0]])
    out = tiny_llama.hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                       pad_token_id=tiny_llama.tokenizer.pad_token_id)[0, ids.shape[1]:]
    assert gp.targets[0].tolist() == [t for t in out.tolist() if t not in special][:3]


def test_nll_equals_a_full_forward(tiny_llama, llama_pairs):
    gp = llama_pairs
    got = G.nll(tiny_llama, gp.sensitive, gp.targets, batch_size=2)
    for i in range(len(gp)):
        seq = torch.cat([gp.sensitive[i], gp.targets[i]])[None]
        with torch.no_grad():
            logp = tiny_llama.bridge(seq)[0].float().log_softmax(-1)
        n, P = len(gp.targets[i]), len(gp.sensitive[i])
        want = -torch.stack([logp[P - 1 + k, gp.targets[i][k]] for k in range(n)]).mean()
        assert got[i].item() == pytest.approx(want.item(), abs=1e-4)


@pytest.mark.parametrize("align", ["end", "start"])
@pytest.mark.parametrize("direction", ["necessity", "sufficiency"])
def test_batched_interchange_equals_the_papers_loop(tiny_model, direction, align):
    m = tiny_model
    gp = G.prepare_pairs(m, load_safety_pairs().head(3), max_target_tokens=3)
    assert len(set(gp.pairs.n_sensitive) | set(gp.pairs.n_control)) > 1  # prompts of different lengths
    fast = G.interchange(m, gp, direction, align, max_batch=6, pairs_per_batch=2, progress=False)
    slow = G.interchange_loop(m, gp, direction, align)
    assert len(fast) == m.n_layers * m.n_heads * len(gp)
    assert fast[["layer", "head", "pair_id"]].values.tolist() == slow[["layer", "head", "pair_id"]].values.tolist()
    assert fast.patched.values == pytest.approx(slow.patched.values, abs=1e-4)
    assert fast.baseline.values == pytest.approx(slow.baseline.values, abs=1e-4)


def test_interchange_resumes_after_a_kill(tiny_llama, llama_pairs, tmp_path, monkeypatch):
    store = ResultsStore("m", root=tmp_path)
    whole = G.interchange(tiny_llama, llama_pairs, checkpoint=store.checkpoint("whole", {}), pairs_per_batch=2,
                          progress=False)
    real, calls, state = G._nll, [], {"die": True}

    def dying(logits, targets):
        calls.append(1)
        if state["die"] and len(calls) == 5:
            raise RuntimeError("killed")
        return real(logits, targets)

    monkeypatch.setattr(G, "_nll", dying)
    ck = store.checkpoint("resumed", {})
    with pytest.raises(RuntimeError, match="killed"):
        G.interchange(tiny_llama, llama_pairs, checkpoint=ck, pairs_per_batch=2, progress=False)
    done = len(list(store.path("resumed", {}, ".parts").glob("*.parquet")))
    state["die"], n_before = False, len(calls)
    again = G.interchange(tiny_llama, llama_pairs, checkpoint=ck, pairs_per_batch=2, progress=False)
    assert done > 0 and len(calls) - n_before < n_before + 10
    pd.testing.assert_frame_equal(again, whole)


def test_summary_gate_and_statistics():
    rows = []
    for l, h, eff in [(0, 0, 0.1), (0, 1, 1.0), (1, 0, -0.2)]:
        for p, noise in zip("abcd", (0.01, -0.01, 0.02, -0.02)):
            rows.append({"layer": l, "head": h, "pair_id": p, "effect": eff + noise})
    nec = pd.DataFrame(rows)
    suf = nec.assign(effect=nec.effect / 2)
    gap = pd.DataFrame({"pair_id": list("abcd"), "gap": [2.0, 2.0, 2.0, 2.0]})
    s = G.summarise(nec, suf, gap)
    g = G.gate_of(s)
    assert (g.layer, g["head"]) == (0, 1) and g.necessity_pct == pytest.approx(50.0) and g["rank"] == 1
    assert g.combined == pytest.approx(75.0)
    assert G.permutation_p(nec[(nec.layer == 0) & (nec["head"] == 1)].effect.values, n=2000) < 0.1
    assert G.permutation_p(np.array([1.0, -1.0, 1.0, -1.0]), n=2000) > 0.3
    stab = G.bootstrap_stability(nec, suf, gap, (0, 1), n=200)
    assert stab["gate_share"] == 1.0 and stab["top3_share"] == 1.0


def test_bad_pair_files(tmp_path):
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(G.PairsError, match="empty"):
        G.load_pairs(empty)
    cols = tmp_path / "c.csv"
    pd.DataFrame({"harmful": ["x"], "control": ["y"]}).to_csv(cols, index=False)
    with pytest.raises(G.PairsError, match="'sensitive'"):
        G.load_pairs(cols)
    ok = tmp_path / "ok.csv"
    pd.DataFrame({"sensitive": ["a", "b"], "control": ["c", "d"]}).to_csv(ok, index=False)
    df = G.load_pairs(ok)
    assert list(df.pair_id) == ["pair0000", "pair0001"]
    with pytest.raises(G.PairsError, match="larger than the pair file"):
        G.prepare_pairs(None, df, n_pairs=3)


def _scaled_patch_nll(model, gp, direction, align, layer, head, eps):
    """NLL of every pair's target run with head ``(layer, head)``'s ``z`` moved ``eps`` of the way
    to the source's (``eps = 1`` is the interchange), through the exact engine."""
    idx = list(range(len(gp)))
    target, source = G._runs(gp, idx, direction, align)
    mask, src = G._alignment(target, source, align, model.device)
    with torch.no_grad():
        aligned = G._source_z(model, source, [layer], src)[layer]
        c = G._target_batch(model, target, gp.targets, [layer])
        out = G._patched_nll(model, c, layer, [head], lambda z, h: z + eps * (aligned[:, :, h] - z), mask)
    return out[0].double()


@pytest.mark.parametrize("align", ["end", "start"])
@pytest.mark.parametrize("direction", ["necessity", "sufficiency"])
def test_attribution_equals_a_finite_difference_of_the_nll(tiny_model, direction, align):
    gp = G.prepare_pairs(tiny_model, load_safety_pairs().head(3), max_target_tokens=3)
    heads = [(0, 0), (tiny_model.n_layers - 1, tiny_model.n_heads - 1)]
    est = G.attribution(tiny_model, gp, direction, align, heads=heads, progress=False)
    assert len(est) == len(heads) * len(gp)
    eps = 1e-2
    for l, h in heads:
        fd = (_scaled_patch_nll(tiny_model, gp, direction, align, l, h, eps)
              - _scaled_patch_nll(tiny_model, gp, direction, align, l, h, -eps)) / (2 * eps)
        got = est[(est.layer == l) & (est["head"] == h)]
        slope = torch.tensor((got.patched - got.baseline).values, dtype=torch.float64)
        assert torch.allclose(slope, fd, rtol=2e-2, atol=2e-4), (l, h, slope, fd)
        sign = -1 if direction == "necessity" else 1
        assert np.allclose(got.effect, sign * slope.numpy(), atol=1e-7)


def test_attribution_ranks_like_the_exact_interchange_on_a_nearly_linear_model(tiny_llama, llama_pairs):
    # on a random tiny model one head's interchange is a small change: the estimate is close to exact
    exact = G.interchange(tiny_llama, llama_pairs, "necessity", progress=False)
    est = G.attribution(tiny_llama, llama_pairs, "necessity", progress=False)
    a = exact.groupby(["layer", "head"]).effect.mean()
    b = est.groupby(["layer", "head"]).effect.mean()
    assert a.index.equals(b.index)
    assert np.corrcoef(a.values, b.values)[0, 1] > 0.9
