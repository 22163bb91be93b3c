import json
"""The gate: NLL metric, position alignment of pairs of different lengths, the exact batched interchange
against the paper's one-forward-per-head-per-pair procedure, the gate and its statistics."""
import numpy as np
import pandas as pd
import pytest
import torch

from refusal_circuits import engine as E
from refusal_circuits import gate as G
from refusal_circuits.data import load_safety_pairs
from refusal_circuits.results import ResultsStore


@pytest.fixture(scope="module")
def llama_pairs(tiny_llama):
    return G.prepare_pairs(tiny_llama, load_safety_pairs().head(3), max_target_tokens=3)


def test_position_map_every_mode():
    # target run: a 3-token prompt + 2 target tokens in a width-6 batch (one pad); source prompt of 4 tokens
    # in width 4 (width 6 with the targets, for "answer")
    mask, src = E.position_map([3], [4], [2], 6, 4, "prompt")
    assert mask[0].tolist() == [False, True, True, True, False, False]        # prompt only, never the targets
    assert src[0, 1:4].tolist() == [1, 2, 3]                                   # aligned from the prompts' ends
    mask, src = E.position_map([3], [4], [2], 6, 4, "last")
    assert mask[0].tolist() == [False, False, False, True, False, False] and src[0, 3] == 3
    mask, src = E.position_map([3], [4], [2], 6, 4, "paper")
    assert mask[0].tolist() == [False, True, True, True, True, False]         # min(5, 4) from the start:
    assert src[0, 1:5].tolist() == [0, 1, 2, 3]                                # the longer source reaches a target
    mask, src = E.position_map([3], [4], [2], 6, 6, "answer")
    assert mask[0].tolist() == [False, True, True, True, True, True]           # targets swapped too
    assert src[0, 1:].tolist() == [1, 2, 3, 4, 5]
    # a shorter source under "paper": the target's last prompt position and its targets keep their own
    mask, src = E.position_map([4], [2], [1], 5, 2, "paper")
    assert mask[0].tolist() == [True, True, False, False, False] and src[0, :2].tolist() == [0, 1]
    assert E.resolve_positions("start") == "paper" and E.resolve_positions("end") == "answer"
    with pytest.raises(ValueError, match="positions must be one of"):
        E.position_map([3], [3], [1], 4, 3, "middle")


@pytest.mark.parametrize("mode", ["prompt", "last", "paper", "answer"])
def test_padded_map_equals_the_plain_list(mode):
    lt, ls, nt = [5, 3, 4], [3, 6, 4], [2, 1, 3]
    extra = [n if mode == "answer" else 0 for n in nt]
    T, S = max(a + b for a, b in zip(lt, nt)), max(a + b for a, b in zip(ls, extra))
    mask, src = E.position_map(lt, ls, nt, T, S, mode)
    for b in range(3):
        off_t, off_s = T - lt[b] - nt[b], S - ls[b] - extra[b]
        want = {(pt + off_t, ps + off_s) for pt, ps in E.plain_positions(lt[b], ls[b], nt[b], mode)}
        got = {(int(p), int(src[b, p])) for p in range(T) if mask[b, p]}
        assert got == want


def test_qwen3_prompts_end_with_a_closed_think_block_as_the_papers_do():
    from refusal_circuits import load_model

    m = load_model("tiny-qwen3-2l", device="cpu")
    assert m.format_prompt("Hi").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


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


@pytest.mark.parametrize("align", ["prompt", "last", "paper", "answer"])
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
    real, calls, state = E.target_nll, [], {"die": False}

    def dying(logits, targets):
        calls.append(1)
        if state["die"] and len(calls) == 5:
            raise RuntimeError("killed")
        return real(logits, targets)

    monkeypatch.setattr(E, "target_nll", dying)
    G.interchange(tiny_llama, llama_pairs, pairs_per_batch=2, progress=False)
    n_full, calls[:], state["die"] = len(calls), [], True
    ck = store.checkpoint("resumed", {})
    with pytest.raises(RuntimeError, match="killed"):
        G.interchange(tiny_llama, llama_pairs, checkpoint=ck, pairs_per_batch=2, progress=False)
    parts = store.path("resumed", {}, ".parts")
    done, planned = len(list(parts.glob("*.parquet"))), len(json.loads((parts / "plan.json").read_text())["items"])
    state["die"], n_before = False, len(calls)
    again = G.interchange(tiny_llama, llama_pairs, checkpoint=ck, pairs_per_batch=2, progress=False)
    # every finished part took at least one call, so a full recompute (n_full calls) fails this bound
    assert 0 < done < planned and 0 < len(calls) - n_before <= n_full - done
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
    per_head, st = G.gate_statistics(nec, suf, gap, n_perm=2000, n_boot=200, k=1)
    assert st["gate"] == "L0H1" and st["runner_up"] == "L0H0" and st["stands_out"]
    assert st["first_share"] == 1.0 and st["jaccard_mean"] == 1.0
    assert per_head.combined.iloc[0] == pytest.approx(75.0)
    # four pairs: 16 sign patterns, so the smallest family-wise p is about 1/16
    assert 0.04 < st["gate_p_fwer"] < 0.1


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
    target, source, mask, src = G.alignment(gp, idx, direction, align, model.device)
    with torch.no_grad():
        aligned = E.source_z(model, source, [layer], src)[layer]
        c = E.target_batch(model, target, gp.targets, [layer])
        out = E.edited_nll(model, c, layer, [head], lambda z, h: z + eps * (aligned[:, :, h] - z), mask)
    return out[0].double()


@pytest.mark.parametrize("align", ["prompt", "last", "paper", "answer"])
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


def test_routing_sparsity_reads_a_planted_gate_and_refuses_holes():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(1)
    rows = [{"layer": l, "head": h, "pair_id": f"p{i}", "method": "exact",
             "effect": (3.0 if (l, h) == (1, 2) else 0.0) + rng.normal(0, 0.05)}
            for l in range(3) for h in range(4) for i in range(20)]
    nec = pd.DataFrame(rows)
    sp = G.routing_sparsity(nec, n_boot=200).set_index("statistic")
    assert sp.loc["top1", "estimate"] > 0.8 and sp.loc["gini", "lo"] > 0.7
    assert (sp.n_heads == 12).all() and (sp.n_pairs == 20).all() and (sp.n_exact_heads == 12).all()
    nec.loc[nec.layer == 0, "method"] = "attribution"
    assert (G.routing_sparsity(nec, n_boot=20).n_exact_heads == 8).all()
    with pytest.raises(ValueError, match="every head on every pair"):
        G.routing_sparsity(nec.iloc[1:], n_boot=20)
    with pytest.raises(ValueError, match="empty"):
        G.routing_sparsity(nec.iloc[:0])
