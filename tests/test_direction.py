import pytest
import torch

from refusal_circuits.direction import (ablation_hooks, addition_hooks, candidate_directions, component_by_layer,
                                        component_hooks, post_instruction_positions, select_direction)

PROMPTS = ["Write a poem about the sea", "How do I bake bread?", "Tell me a joke about cats",
           "Explain photosynthesis simply"]


def test_post_instruction_positions_matches_template(tiny_llama):
    n = post_instruction_positions(tiny_llama)
    ids, _ = tiny_llama.to_tokens(["Hello world"])
    suffix = tiny_llama.tokenizer.decode(ids[0, -n:])
    assert "Hello world" not in suffix and "world" in tiny_llama.tokenizer.decode(ids[0, -n - 1:])


def test_planted_direction_is_recovered_at_its_layer_position_and_sign(tiny_llama):
    m = tiny_llama
    torch.manual_seed(1)
    v = torch.randn(m.d_model)

    def plant(x, hook):
        x = x.clone()
        x[:, -2] += v
        return x

    positions = [-3, -2, -1]
    harmless, _ = candidate_directions(m, PROMPTS, PROMPTS, positions)
    with m.bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", plant)]):
        from refusal_circuits.direction import mean_resid
        planted = mean_resid(m, PROMPTS, positions)
    diff = planted - mean_resid(m, PROMPTS, positions)
    assert torch.allclose(diff[1, 1], v.double(), atol=1e-4)       # layer 1, position -2, + sign
    assert diff[0].abs().max() < 1e-6                                 # nothing at layer 0
    assert diff[1, [0, 2]].abs().max() < 1e-6                         # nothing at other positions
    assert harmless.abs().max() < 1e-6                                # identical sets -> zero


def test_ablation_removes_the_direction_everywhere(tiny_model):
    m = tiny_model
    torch.manual_seed(0)
    d = torch.randn(m.d_model)
    r = d / d.norm()
    seen = {}

    def grab(x, hook):
        seen[hook.name] = (x.float() @ r).abs().max().item()

    names = [f"blocks.{l}.hook_{k}" for l in range(m.n_layers) for k in ("resid_pre", "resid_mid")]
    names.append(f"blocks.{m.n_layers - 1}.hook_resid_post")
    ids, mask = m.to_tokens(PROMPTS[:2])
    with torch.no_grad(), m.bridge.hooks(fwd_hooks=ablation_hooks(m, d) + [(n, grab) for n in names]):
        m.bridge(ids, attention_mask=mask)
    assert max(seen.values()) < 1e-4 and len(seen) == len(names)


def test_addition_and_clamp(tiny_llama):
    m = tiny_llama
    torch.manual_seed(0)
    d = torch.randn(m.d_model)
    base = component_by_layer(m, PROMPTS[:2], d)
    added = component_by_layer(m, PROMPTS[:2], d, addition_hooks(m, 2.0 * d, layer=1))
    b1 = base.query("layer == 1").component.values
    a1 = added.query("layer == 1").component.values
    assert a1 == pytest.approx(b1 + 2.0 * d.norm().item(), abs=1e-3)   # + 2|d| along r̂
    assert added.query("layer == 0").component.values == pytest.approx(base.query("layer == 0").component.values)
    clamped = component_by_layer(m, PROMPTS[:2], d, component_hooks(1, d, 7.5))
    assert clamped.query("layer == 1").component.values == pytest.approx([7.5, 7.5], abs=1e-4)


def test_select_direction_respects_filters(tiny_llama):
    m = tiny_llama
    torch.manual_seed(0)
    cands = torch.randn(m.n_layers, 2, m.d_model, dtype=torch.float64)
    choice = select_direction(m, cands, [-2, -1], PROMPTS[:2], PROMPTS[2:], progress=False)
    s = choice.scores
    assert len(s) == 2 * sum(1 for l in range(m.n_layers) if l < 0.8 * m.n_layers)
    assert {"bypass", "induce", "kl", "kept"} <= set(s.columns)
    pool = s[s.kept] if s.kept.any() else s
    best = pool.sort_values("bypass").iloc[0]
    assert (choice.layer, choice.position) == (best.layer, best.position)
    assert torch.equal(choice.direction, cands[choice.layer, [-2, -1].index(choice.position)])
    assert (s.kl >= -1e-6).all()


def test_notebook_pipeline_runs_on_every_architecture(tiny_model, tmp_path):
    """Every analysis of notebooks 02-03 runs end to end on each architecture family."""
    from refusal_circuits import ResultsStore, align_pairs, load_toy_pairs
    from refusal_circuits import patching as P
    from refusal_circuits.direction import block_contributions, clamp_sweep, paired_block_contributions, self_repair
    from refusal_circuits.stages import refusal_direction

    m = tiny_model
    store = ResultsStore(m.slug, root=tmp_path)
    choice = refusal_direction(m, store, n_train=4, n_val=2, layer_stride=1, progress=False)
    assert 0 <= choice.layer < m.n_layers and choice.position < 0
    again = refusal_direction(m, store, n_train=4, n_val=2, layer_stride=1, progress=False)  # from disk
    assert torch.equal(again.direction, choice.direction) and again.layer == choice.layer
    pairs = align_pairs(m, load_toy_pairs().head(3))
    h, s = list(pairs.pairs.harmful), list(pairs.pairs.harmless)
    per_pair, summary = paired_block_contributions(m, h, s, choice.direction)
    assert len(summary) == 2 * m.n_layers and per_pair["diff"].notna().all()
    assert len(block_contributions(m, h, choice.direction)) == 3 * 2 * m.n_layers
    clamp = clamp_sweep(m, h, choice.direction, choice.layer, [0.0, 1.0])
    assert len(clamp) == 6 and clamp.logit_metric.notna().all()
    repair = self_repair(m, h, choice.direction, [0])
    zeroed = repair[(repair.ablated_at == 0) & (repair.layer == 0)].component
    assert zeroed.abs().max() < 1e-4
    df = P.patch_sweep(m, pairs, P.grouped_block_patches(m, 2), "noising", progress=False)
    assert df.fraction.notna().all()
