"""Head classes: scores of hand-set patterns, classes, class patching against a one-pass-per-patch
loop (query heads of grouped-query models), patched generation, head writes."""
import pandas as pd
import pytest
import torch

from refusal_circuits import align_pairs, hooks, load_toy_pairs
from refusal_circuits import heads as H
from refusal_circuits.patching import default_metric, patch_sweep


def _causal(rows):
    """A [1, 1, T, T] pattern from a list of rows (each normalised, lower triangular)."""
    t = torch.tensor(rows, dtype=torch.float32)
    assert torch.allclose(t.sum(-1), torch.ones(len(rows))) and torch.equal(t, t.tril())
    return t[None, None]


def test_direct_score_reads_last_query_to_subject_key_not_the_transpose():
    subject = 2
    rows = [[1, 0, 0, 0, 0], [0.5, 0.5, 0, 0, 0], [0.2, 0.2, 0.6, 0, 0], [0.25, 0.25, 0.25, 0.25, 0],
            [0.1, 0.1, 0.7, 0.05, 0.05]]
    p = _causal(rows)
    s = H.pattern_scores(p, torch.tensor([subject]))
    assert s["direct"].item() == pytest.approx(0.7)
    # query and key swapped (pattern[key, query]) would read row `subject`, column T-1: zero under causality
    swapped = H.pattern_scores(p.transpose(-1, -2), torch.tensor([subject]))
    assert swapped["direct"].item() != pytest.approx(0.7)


def test_off_by_one_subject_is_caught():
    # the last query attends to the position *before* the subject
    rows = [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0.9, 0.1, 0, 0]]
    s = H.pattern_scores(_causal(rows), torch.tensor([2]))
    assert s["direct"].item() == pytest.approx(0.1)
    assert H.pattern_scores(_causal(rows), torch.tensor([1]))["direct"].item() == pytest.approx(0.9)


def test_diagonal_and_bos_scores_are_means_over_query_positions():
    prev = [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 1]]
    s = H.pattern_scores(_causal(prev), torch.tensor([2]))
    assert s["diagonal"].item() == pytest.approx(3 / 4)   # q = 1, 2, 3 look back one; q = 4 at itself
    assert s["BOS"].item() == pytest.approx(1 / 4)        # only q = 1 attends to position 0
    with pytest.raises(ValueError, match="query"):
        H.pattern_scores(torch.zeros(1, 1, 3, 4), torch.tensor([0]))


def test_head_scores_on_a_model_match_its_patterns(tiny_llama):
    m = tiny_llama
    pairs = align_pairs(m, load_toy_pairs().head(3))
    df = H.head_scores(m, pairs, "all")
    assert len(df) == len(pairs) * 2 * m.n_layers * m.n_heads
    assert df[["direct", "diagonal", "BOS"]].stack().between(0, 1).all()
    toks = pairs.tokens_a[1][None]
    _, cache = m.bridge.run_with_cache(toks, names_filter=[hooks.pattern(1)])
    want = cache[hooks.pattern(1)][0, 3, -1, int(pairs.pairs.subject_pos[1])].item()
    row = df[(df.pair_id == pairs.pairs.pair_id[1]) & (df.kind == "harmful") & (df.layer == 1) & (df["head"] == 3)]
    assert row.direct.item() == pytest.approx(want, abs=1e-6)


def test_classify_heads_by_threshold():
    summary = pd.DataFrame({"layer": [0, 0, 1, 1, 1], "head": [0, 1, 0, 1, 2], "kind": "all",
                            "direct_mean": [0.5, 0.1, 0.05, 0.1, 0.25], "diagonal_mean": [0.3, 0.4, 0.1, 0.0, 0.0],
                            "BOS_mean": [0.1, 0.2, 0.9, 0.3, 0.6]})
    c = H.classify_heads(summary, 0.2, 0.5)
    assert c["class"].tolist() == ["direct", "diagonal", "BOS", "other", "direct"]
    assert H.heads_of(c, "direct") == [(0, 0), (1, 2)]  # strongest first
    labels = [p.label for p in H.class_patches(c)]
    assert labels == ["direct", "diagonal", "direct + diagonal", "all other heads"]
    with pytest.raises(ValueError, match="threshold"):
        H.classify_heads(summary, 1.5)


def _one_pass_loop(m, pairs, head_set, mode):
    """One forward per pair with a plain hook writing the source's z of ``head_set``."""
    out = []
    metric = default_metric(m)
    for i in range(len(pairs)):
        a, b = pairs.tokens_a[i][None], pairs.tokens_b[i][None]
        tgt, src = (a, b) if mode == "noising" else (b, a)
        names = sorted({hooks.z(l) for l, _ in head_set})
        _, cache = m.bridge.run_with_cache(src, names_filter=names)
        fwd = []
        for l, h in head_set:
            def hook(z, hook, l=l, h=h):
                z = z.clone()
                z[:, :, h] = cache[hooks.z(l)][:, :, h]
                return z
            fwd.append((hooks.z(l), hook))
        with torch.no_grad(), m.bridge.hooks(fwd_hooks=fwd):
            out.append(metric(m.bridge(tgt)[:, -1]).item())
    return out


@pytest.mark.parametrize("mode", ["noising", "denoising"])
def test_class_patching_equals_a_one_patch_per_pass_loop(tiny_model, mode):
    m = tiny_model
    pairs = align_pairs(m, load_toy_pairs().head(4))
    summary = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 2, 3], "kind": "all",
                            "direct_mean": [0.5, 0.0, 0.3, 0.0], "diagonal_mean": [0.0, 0.5, 0.0, 0.0],
                            "BOS_mean": [0.0, 0.0, 0.0, 0.9]})
    classes = H.classify_heads(summary)
    patches = H.class_patches(classes)
    df = patch_sweep(m, pairs, patches, mode, max_batch=8, progress=False)
    for p in patches:
        heads = [(s.hook and hooks.layer_of(s.hook), s.head) for s in p.sites]
        got = df[df.label == p.label].patched.values
        assert got == pytest.approx(_one_pass_loop(m, pairs, heads, mode), abs=1e-4), p.label


def test_query_heads_of_one_kv_group_are_patched_separately(tiny_llama):
    """Grouped-query attention (4 query heads, 2 KV heads): two query heads sharing a KV head are
    different patches with different effects."""
    m = tiny_llama
    assert m.cfg.n_key_value_heads < m.n_heads
    pairs = align_pairs(m, load_toy_pairs().head(3))
    a = _one_pass_loop(m, pairs, [(1, 0)], "noising")
    b = _one_pass_loop(m, pairs, [(1, 1)], "noising")
    assert a != pytest.approx(b, abs=1e-6)


def test_z_write_hooks_patch_the_prompt_pass_only(tiny_llama):
    m = tiny_llama
    pairs = align_pairs(m, load_toy_pairs().head(2))
    idx = pairs.length_groups()[len(pairs.tokens_a[0])]
    tgt, src = pairs.batch(idx)
    heads = [(0, 1), (1, 2)]
    names = [hooks.z(0), hooks.z(1)]
    _, cache = m.bridge.run_with_cache(src, names_filter=names)
    fwd = H.z_write_hooks(heads, {n: cache[n] for n in names}, tgt.shape[1])
    calls = []
    spy = [(hooks.z(1), lambda z, hook: calls.append(z.shape[1]))]
    with torch.no_grad(), m.bridge.hooks(fwd_hooks=fwd):
        patched_logits = m.bridge(tgt)[:, -1]
    with torch.no_grad(), m.bridge.hooks(fwd_hooks=fwd + spy):
        out = m.hf_model.generate(input_ids=tgt, max_new_tokens=3, do_sample=False,
                                  pad_token_id=m.tokenizer.pad_token_id)
    assert torch.equal(out[:, tgt.shape[1]], patched_logits.argmax(-1))  # first token: the patched run's
    assert calls[0] == tgt.shape[1] and set(calls[1:]) == {1}           # later steps: one new position
    g = H.patched_generations(m, pairs, heads, "noising", max_new_tokens=3)
    assert list(g.columns) == ["pair_id", "instruction", "completion", "refused"] and len(g) == len(pairs)


def test_head_writes_find_a_planted_direction(tiny_llama):
    m = tiny_llama
    pairs = align_pairs(m, load_toy_pairs().head(3))
    harm = H.head_outputs(m, list(pairs.pairs.harmful), [0, 1])
    safe = H.head_outputs(m, list(pairs.pairs.harmless), [0, 1])
    planted = (harm - safe)[:, 1, 2].mean(0)                      # head L1H2's mean differential output
    writes = H.head_writes(m, pairs, torch.stack([planted, -planted]), [0, 1])
    assert writes.shape == (2, len(pairs), 2, m.n_heads)
    assert writes[0, :, 1, 2].mean() > 0 and writes[1, :, 1, 2].mean() < 0
    stat = H.direct_vs_rest(writes, [0, 1], [(1, 2)])
    assert stat[0] > 0 and stat[1] == pytest.approx(-stat[0], abs=1e-5)
    # the head output is z @ W_O: the heads of a layer sum to its attention output (Llama: no output bias)
    ids, _ = m.to_tokens([pairs.pairs.harmful[0]])
    _, cache = m.bridge.run_with_cache(ids, names_filter=[hooks.attn_out(1)])
    assert harm[0, 1].sum(0) == pytest.approx(cache[hooks.attn_out(1)][0, -1], abs=1e-4)


def test_mean_z_hooks_set_the_last_positions(tiny_llama):
    m = tiny_llama
    means = H.mean_z(m, ["Tell me about cats", "Write a poem"], [(1, 0)], n_last=3)
    assert means[(1, 0)].shape == (3, m.cfg.d_head)
    seen = {}
    spy = (hooks.z(1), lambda z, hook: seen.setdefault("z", z.detach().clone()))
    ids, mask = m.to_tokens(["How do I bake bread?"])
    with torch.no_grad(), m.bridge.hooks(fwd_hooks=list(H.mean_z_hooks(means)) + [spy]):
        m.bridge(ids, attention_mask=mask)
    assert torch.allclose(seen["z"][0, -3:, 0], means[(1, 0)], atol=1e-6)
    assert not torch.allclose(seen["z"][0, -4, 0], means[(1, 0)][0], atol=1e-6)


def test_random_directions_are_seeded_unit_vectors():
    a, b = H.random_directions(5, 16, seed=1), H.random_directions(5, 16, seed=1)
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=-1), torch.ones(5))


def test_patched_generations_batch_across_lengths_like_one_pair_at_a_time(tiny_llama):
    m = tiny_llama
    pairs = align_pairs(m, load_toy_pairs().head(5))
    assert len(pairs.length_groups()) > 1  # the batch mixes prompt lengths (left padding)
    one = H.patched_generations(m, pairs, [(0, 1), (1, 3)], "denoising", max_new_tokens=4, batch_size=1)
    many = H.patched_generations(m, pairs, [(0, 1), (1, 3)], "denoising", max_new_tokens=4, batch_size=5)
    assert one.completion.tolist() == many.completion.tolist()
    plain = H.patched_generations(m, pairs, [(0, 1)], "denoising", max_new_tokens=4, batch_size=5)
    assert plain.pair_id.tolist() == list(pairs.pairs.pair_id)
