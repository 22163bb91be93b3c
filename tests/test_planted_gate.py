"""A hand-planted gate: a tiny model whose layer-0 head is necessary (it feeds three layer-1 "amplifier"
heads) while writing nothing the unembedding can read. Interchange must rank it first; DLA must not."""
import pytest
import torch

from refusal_circuits import gate as G
from refusal_circuits.data import load_safety_pairs
from refusal_circuits.models import ChatModel, _boot_bridge, derive_refusal_tokens, format_chat, load_tiny_hf

GATE, AMPS = (0, 0), [(1, 0), (1, 1), (1, 2)]
GATE_SCALE, AMP_SCALE = 0.05, 4.0   # small enough that the norms stay near their linear regime


def _mean_z(hf, tok, prompt, dh):
    """The gate's z (its slice of layer 0's output-projection input), mean over positions."""
    seen = {}
    hook = hf.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, inp: seen.setdefault("z", inp[0]))
    ids = torch.tensor([tok(format_chat(tok, prompt), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hf(input_ids=ids)
    hook.remove()
    return seen["z"][0, :, GATE[1] * dh:(GATE[1] + 1) * dh].mean(0)


def build_planted(n_pairs: int = 6):
    hf, tok = load_tiny_hf("llama", seed=3, n_layers=2)
    tok.padding_side = "left"
    cfg = hf.config
    d, dh = cfg.hidden_size, cfg.head_dim
    g = torch.Generator().manual_seed(0)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    b = torch.randn(dh, generator=g)
    b /= b.norm()
    ids, top = derive_refusal_tokens(tok)
    pairs = load_safety_pairs().head(n_pairs)
    with torch.no_grad():
        W_U = hf.lm_head.weight                                      # [vocab, d]
        W_U -= (W_U @ u)[:, None] * u[None]                          # nothing the unembedding reads lies along u
        r = W_U[ids].mean(0)
        r /= r.norm()
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.zero_()                       # no MLPs
            layer.self_attn.q_proj.weight.zero_()                    # uniform causal attention everywhere
            layer.self_attn.k_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()                    # every head silent, except:
        # the gate writes its sensitive - control difference (in z space) along u, which W_U cannot read
        zs, zc = (torch.stack([_mean_z(hf, tok, p, dh) for p in ps]).mean(0) for ps in (pairs.sensitive, pairs.control))
        a = (zs - zc) / (zs - zc).norm()
        hf.model.layers[0].self_attn.o_proj.weight[:, GATE[1] * dh:(GATE[1] + 1) * dh] = GATE_SCALE * u[:, None] * a[None]
        # three amplifiers read u and write the refusal tokens' unembedding direction
        hf.model.layers[1].self_attn.v_proj.weight[:] = (b[:, None] * u[None]).repeat(cfg.num_key_value_heads, 1)
        for _, h in AMPS:
            hf.model.layers[1].self_attn.o_proj.weight[:, h * dh:(h + 1) * dh] = AMP_SCALE * r[:, None] * b[None]
    model = ChatModel("planted-gate", _boot_bridge(hf, tok, "planted-gate"), tok, ids, top)
    return model, G.prepare_pairs(model, pairs, max_target_tokens=3)


@pytest.fixture(scope="module")
def planted():
    return build_planted()


def test_interchange_finds_the_planted_gate_and_dla_does_not(planted):
    model, gp = planted
    gap = G.gaps(model, gp)
    assert gap.gap.mean() > 0, "the planted circuit makes the control's answer less likely after sensitive prompts"
    nec = G.interchange(model, gp, "necessity", progress=False)
    suf = G.interchange(model, gp, "sufficiency", progress=False)
    summary = G.summarise(nec, suf, gap)
    g = G.gate_of(summary)
    assert (g.layer, g["head"]) == GATE
    amp = summary[[(l, h) in AMPS for l, h in zip(summary.layer, summary["head"])]]
    assert (amp.combined < g.combined).all() and (amp.combined > 0).all()
    dla, _ = G.head_dla(model, gp, n_boot=50)
    ranked = dla.assign(a=dla.dla.abs()).sort_values("a", ascending=False).reset_index(drop=True)
    assert {tuple(x) for x in ranked[["layer", "head"]].head(3).values.tolist()} == set(AMPS)
    gate_dla = abs(dla.set_index(["layer", "head"]).loc[GATE, "dla"])
    assert gate_dla < 1e-3 * ranked.a.iloc[0]                        # the gate's own DLA is ~0
