"""DLA through the frozen final norm: components sum to the final residual, the final residual gives the
logit metric (so a skipped or doubled norm fails), heads sum to their block, unembedding checks."""
import numpy as np
import pytest
import torch

from refusal_circuits import dla as D
from refusal_circuits import hooks
from refusal_circuits.metrics import logit_refusal_metric

PROMPTS = ["Tell me about cats", "How do I bake a loaf of bread?", "Hi"]


def test_linear_norm_reproduces_the_models_final_norm(tiny_model):
    m = tiny_model
    ids, mask = m.to_tokens(PROMPTS)
    _, cache = m.bridge.run_with_cache(ids, attention_mask=mask)
    norm = D.final_norm(m)
    x = cache[hooks.final_resid(m.n_layers)]
    y = norm(x, cache[hooks.final_norm_scale()]) + norm.bias
    assert torch.allclose(y, cache["ln_final.hook_out"].float(), atol=1e-4)


def test_components_sum_to_the_final_dla_which_is_the_logit_metric(tiny_model):
    m = tiny_model
    lens = D.logit_lens_dla(m, PROMPTS, batch_size=2)
    comp = D.component_dla(m, PROMPTS, batch_size=2)
    final = lens[lens.layer == m.n_layers].set_index("prompt")
    blocks = comp[comp.block != "head"].groupby("prompt").dla.sum()
    assert blocks.values == pytest.approx(final.dla.values, abs=1e-3)
    assert set(comp[comp.block != "head"].block) == {"embed", "attn", "mlp"}
    # the final residual's DLA plus the bias terms is the metric the model's logits give; a skipped
    # final norm or one applied twice would not be
    softcap = getattr(m.hf_model.config, "final_logit_softcapping", None)
    ids, mask = m.to_tokens(PROMPTS)
    with torch.no_grad():
        _, cache = m.bridge.run_with_cache(ids, attention_mask=mask)
        pre_cap = cache["ln_final.hook_out"][:, -1].float() @ m.W_U.float()
        if getattr(m.bridge, "b_U", None) is not None:
            pre_cap = pre_cap + m.bridge.b_U.float()
        metric = logit_refusal_metric(pre_cap, m.refusal_token_id)
    assert (final.dla + D.bias_term(m)).values == pytest.approx(metric.numpy(), abs=1e-3)
    if not softcap:
        assert (final.dla + D.bias_term(m)).values == pytest.approx(final.metric.values, abs=1e-3)
    wrong_twice = (final.dla.values / cache[hooks.final_norm_scale()][:, -1, 0].numpy())
    assert not np.allclose(wrong_twice + D.bias_term(m), metric.numpy(), atol=1e-2)


def test_heads_sum_to_their_attention_block_on_every_architecture(tiny_model):
    """Also on Gemma-2 and GLM-4, whose attention output passes a post-attention norm."""
    m = tiny_model
    comp = D.component_dla(m, PROMPTS[:2], batch_size=2)
    heads = comp[comp.block == "head"].groupby(["prompt", "layer"]).dla.sum()
    attn = comp[comp.block == "attn"].set_index(["prompt", "layer"]).dla
    assert heads.loc[attn.index].values == pytest.approx(attn.values, abs=1e-3)


def test_unembedding_cosines_and_null_space(tiny_llama):
    m = tiny_llama
    t = 17
    cos = D.unembedding_cosines(m, m.W_U[:, t])
    assert cos.cos.iloc[t] == pytest.approx(1.0, abs=1e-5) and cos.cos.abs().max() == pytest.approx(1.0, abs=1e-5)
    S, U = D.unembedding_spectrum(m)
    assert torch.all(S[:-1] >= S[1:]) and U.shape == (m.d_model, m.d_model)
    k = 5
    shares = D.null_space_share(U, torch.stack([U[:, -1], U[:, 0]]), k)
    assert shares == pytest.approx([1.0, 0.0], abs=1e-5)
    from refusal_circuits.heads import random_directions

    rand = D.null_space_share(U, random_directions(2000, m.d_model, 0), k)
    assert rand.mean() == pytest.approx(np.sqrt(k / m.d_model), rel=0.1)
    with pytest.raises(ValueError, match="k must be"):
        D.null_space_share(U, U[:, 0], 0)


def test_paired_difference():
    import pandas as pd

    df = pd.DataFrame({"layer": [0, 0, 0, 0], "prompt": [0, 1, 0, 1], "half": ["harmful"] * 2 + ["harmless"] * 2,
                       "dla": [5.0, 7.0, 1.0, 2.0]})
    d = D.paired_difference(df, ["layer"])
    assert d.dla.tolist() == [4.0, 5.0]
    s = D.summarise_difference(d, ["layer"])
    assert s["mean"].item() == 4.5 and s.lo.item() < 4.5 < s.hi.item()
