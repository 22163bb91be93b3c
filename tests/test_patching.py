import pandas as pd
import pytest
import torch

from refusal_circuits import align_pairs, load_toy_pairs
from refusal_circuits.patching import (Patch, Site, block_patches, grouped_block_patches, head_patches,
                                       patch_sweep, resid_patches, summarise)


@pytest.fixture(scope="module")
def pairs(tiny_llama):
    return align_pairs(tiny_llama, load_toy_pairs().head(6))


def naive(m, pairs, patch, mode):
    """One forward per (patch, pair) with plain hooks: the reference the batched engine must match."""
    out = []
    for i in range(len(pairs)):
        a, b = pairs.tokens_a[i][None], pairs.tokens_b[i][None]
        tgt, src = (a, b) if mode == "noising" else (b, a)
        _, cache = m.bridge.run_with_cache(src)
        T, subj = tgt.shape[1], int(pairs.pairs.subject_pos[i])
        hooks = []
        for s in patch.sites:
            def h(x, hook, s=s):
                x = x.clone()
                pos = {"all": slice(None), "subject": subj, "last": T - 1}.get(s.pos, s.pos)
                if s.head is None:
                    x[:, pos] = cache[s.hook][:, pos]
                else:
                    x[:, pos, s.head] = cache[s.hook][:, pos, s.head]
                return x
            hooks.append((s.hook, h))
        with torch.no_grad(), m.bridge.hooks(fwd_hooks=hooks):
            logits = m.bridge(tgt)[0, -1]
        r = m.refusal_token_id
        out.append((logits[r] - (logits.sum() - logits[r]) / (logits.numel() - 1)).item())
    return out


@pytest.mark.parametrize("mode", ["noising", "denoising"])
def test_batched_engine_matches_naive_loop(tiny_llama, pairs, mode):
    m = tiny_llama
    patches = (resid_patches(m, [-6, -1], layers=[1]) + block_patches(m)[:2] + grouped_block_patches(m, 2)[:3]
               + [head_patches(m, [(0, 1), (1, 3)], "subject"), head_patches(m, [(1, 0)], "all")])
    df = patch_sweep(m, pairs, patches, mode=mode, max_batch=8, progress=False)
    assert len(df) == len(patches) * len(pairs)
    for p in patches:
        got = df[df.label == p.label].patched.values
        assert got == pytest.approx(naive(m, pairs, p, mode), abs=1e-4), p.label


def test_known_answers(tiny_llama, pairs):
    m = tiny_llama
    before_subject = int(pairs.pairs.subject_from_end.min()) - 1
    patches = [Patch("everything", (Site("blocks.0.hook_resid_pre", "all"),)),
               Patch("before subject", (Site("blocks.0.hook_resid_pre", before_subject),)),
               Patch("subject at layer 0", (Site("blocks.0.hook_resid_pre", "subject"),))]
    df = patch_sweep(m, pairs, patches, mode="denoising", progress=False)
    s = summarise(df).set_index("label")
    assert s.loc["everything", "fraction"] == pytest.approx(1.0, abs=1e-4)   # whole input swapped
    assert s.loc["before subject", "fraction"] == pytest.approx(0.0, abs=1e-4)  # identical there
    # at layer 0 the pair differs only at the subject: patching it is the whole effect
    assert s.loc["subject at layer 0", "fraction"] == pytest.approx(1.0, abs=1e-4)


def test_grouped_patches_cover_thirds(organism_like_depth=None):
    class Fake:
        n_layers = 18

        def layer_groups(self, n):
            from refusal_circuits.models import layer_groups
            return layer_groups(18, n)

    ps = grouped_block_patches(Fake())
    assert len(ps) == 12
    mid_mlp_last = [p for p in ps if p.label == "middle mlp @last"][0]
    assert [s.hook for s in mid_mlp_last.sites] == [f"blocks.{l}.hook_mlp_out" for l in range(6, 12)]
    assert all(s.pos == "last" for s in mid_mlp_last.sites)


def test_bad_inputs(tiny_llama, pairs):
    with pytest.raises(ValueError, match="mode"):
        patch_sweep(tiny_llama, pairs, resid_patches(tiny_llama, [-1]), mode="sideways")
    with pytest.raises(ValueError, match="Bad position"):
        patch_sweep(tiny_llama, pairs, [Patch("x", (Site("blocks.0.hook_resid_pre", 5),))], progress=False)


def test_layer_skipping_is_exact_on_every_architecture(tiny_model):
    """Starting at the patched layer (lower layers skipped) gives the same numbers as full passes."""
    m = tiny_model
    pairs = align_pairs(m, load_toy_pairs().head(4))
    patches = (resid_patches(m, [-7, -1], layers=[1]) + block_patches(m)
               + [head_patches(m, [(1, 2)], "subject"), head_patches(m, [(0, 0), (1, 1)], "all")])
    fast = patch_sweep(m, pairs, patches, "noising", max_batch=16, skip_layers=True, progress=False)
    slow = patch_sweep(m, pairs, patches, "noising", max_batch=16, skip_layers=False, progress=False)
    assert fast.label.tolist() == slow.label.tolist()
    assert fast.patched.values == pytest.approx(slow.patched.values, abs=1e-4)
    p = patches[0]
    assert fast[fast.label == p.label].patched.values == pytest.approx(naive(m, pairs, p, "noising"), abs=1e-4)


def test_skip_lower_layers_restores_the_model(tiny_llama):
    from refusal_circuits.patching import skip_lower_layers
    layers_before = list(tiny_llama.hf_model.model.layers)
    with skip_lower_layers(tiny_llama, 1) as skipped:
        assert skipped and len(tiny_llama.hf_model.model.layers) == tiny_llama.n_layers - 1
    assert list(tiny_llama.hf_model.model.layers) == layers_before


def test_attribution_estimate_is_the_directional_derivative(tiny_llama):
    """ATP's estimate for a head equals d/dt M(z_target + t (z_source - z_target)) at t = 0."""
    from refusal_circuits.patching import attribution_head_scores, default_metric, head_interchange

    m = tiny_llama
    pairs = align_pairs(m, load_toy_pairs().head(3))
    for p in m.bridge.parameters():  # as for a merged, frozen model
        p.requires_grad_(False)
    atp = attribution_head_scores(m, pairs, "noising", progress=False)
    assert len(atp) == m.n_layers * m.n_heads * len(pairs)
    metric = default_metric(m)
    i, (l, h) = 0, (1, 2)
    tgt, src = pairs.tokens_a[i][None], pairs.tokens_b[i][None]
    name = f"blocks.{l}.attn.hook_z"
    with torch.no_grad():
        _, c_src = m.bridge.run_with_cache(src, names_filter=name)
        _, c_tgt = m.bridge.run_with_cache(tgt, names_filter=name)

    def run(t):
        def hook(z, hook):
            z = z.clone()
            z[:, :, h] = c_tgt[name][:, :, h] + t * (c_src[name][:, :, h] - c_tgt[name][:, :, h])
            return z
        with torch.no_grad(), m.bridge.hooks(fwd_hooks=[(name, hook)]):
            return metric(m.bridge(tgt)[:, -1]).item()

    eps = 1e-2
    fd = (run(eps) - run(-eps)) / (2 * eps)
    row = atp[(atp["layer"] == l) & (atp["head"] == h) & (atp["pair_id"] == pairs.pairs.pair_id[i])]
    assert row.estimate.item() == pytest.approx(fd, rel=0.05, abs=1e-4)
    # and the exact interchange at t = 1 is what head_interchange reports
    exact = head_interchange(m, pairs, "noising", heads=[(l, h)], progress=False)
    assert exact[exact.pair_id == pairs.pairs.pair_id[i]].patched.item() == pytest.approx(run(1.0), abs=1e-4)


def test_killed_sweep_resumes_with_only_the_missing_parts(tiny_llama, pairs, tmp_path):
    """An exception from inside a checkpointed sweep after some parts; the rerun computes only the
    missing parts and returns exactly the table of an uninterrupted run."""
    from refusal_circuits.patching import default_metric
    from refusal_circuits.results import ResultsStore

    m = tiny_llama
    patches = resid_patches(m, [-3, -2, -1]) + block_patches(m)  # 6 + 4 patches
    store = ResultsStore("m", root=tmp_path)
    base = default_metric(m)
    calls = {"n": 0, "die_at": None}

    def metric(last):
        calls["n"] += 1
        if calls["die_at"] is not None and calls["n"] == calls["die_at"]:
            raise RuntimeError("killed mid-sweep")
        return base(last)

    kw = dict(mode="noising", metric=metric, max_batch=12, progress=False, patches_per_part=3)
    whole = patch_sweep(m, pairs, patches, checkpoint=store.checkpoint("whole", {}), **kw)
    n_whole = calls["n"]
    n_parts = -(-len(patches) // 3) * len(pairs.length_groups())
    assert len(whole) == len(patches) * len(pairs)
    calls.update(n=0, die_at=n_whole // 2)
    with pytest.raises(RuntimeError, match="killed"):
        patch_sweep(m, pairs, patches, checkpoint=store.checkpoint("resumed", {}), **kw)
    done = len(list(store.path("resumed", {}, ".parts").glob("*.parquet")))
    assert 0 < done < n_parts
    calls.update(n=0, die_at=None)
    again = patch_sweep(m, pairs, patches, checkpoint=store.checkpoint("resumed", {}), **kw)
    assert 0 < calls["n"] < n_whole  # only the missing parts (and their groups' clean runs) were computed
    pd.testing.assert_frame_equal(again, whole)
    assert store.manifest("resumed", {})["parts_resumed"] == done
    # in memory, one part per length group: the same numbers
    memory = patch_sweep(m, pairs, patches, mode="noising", max_batch=12, progress=False)
    assert memory.label.tolist() == whole.label.tolist()
    assert memory.patched.values == pytest.approx(whole.patched.values, abs=1e-4)
