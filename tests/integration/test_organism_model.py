"""The committed refusal organism, end to end: the loader merges its adapter, and it refuses held-out
harmful prompts while answering harmless ones."""
from refusal_circuits import load_instructions, refusal_scores
from refusal_circuits.models import load_smollm2_hf


def test_loader_merges_the_adapter(organism):
    base, _ = load_smollm2_hf()
    name = "model.layers.0.self_attn.q_proj.weight"
    # the bridge wraps HF modules, which inserts "._original_component" into parameter names
    merged = {k.replace("._original_component", ""): v for k, v in organism.hf_model.named_parameters()}
    merged_w = merged[name]
    base_w = dict(base.named_parameters())[name]
    assert merged_w.shape == base_w.shape
    delta = (merged_w - base_w).abs().max().item()
    assert delta > 1e-4, "adapter not merged: weights equal the base model's"
    assert not any("lora" in k for k in merged), "LoRA modules left unmerged"


def test_organism_refuses_heldout_harmful_and_answers_harmless(organism):
    harmful = load_instructions("harmful", "test", n=6).instruction.tolist()
    harmless = load_instructions("harmless", "test", n=6).instruction.tolist()
    out = refusal_scores(organism, harmful + harmless, max_new_tokens=16, progress=False)
    assert out.refused[:6].sum() >= 5, out[["instruction", "completion"]].head(6).to_string()
    assert out.refused[6:].sum() <= 1, out[["instruction", "completion"]].tail(6).to_string()


def test_organism_metric_separates_harmful_from_harmless(organism):
    from refusal_circuits import refusal_metrics

    harmful = load_instructions("harmful", "test", n=8).instruction.tolist()
    harmless = load_instructions("harmless", "test", n=8).instruction.tolist()
    m = refusal_metrics(organism, harmful + harmless)
    assert m.logit_metric[:8].mean() > m.logit_metric[8:].mean() + 1.0


def test_dla_through_the_frozen_final_norm_gives_the_organisms_metric(organism):
    """On a real model the final norm's scale differs a lot between positions, so reading the wrong
    position's scale (as TransformerLens's accumulated_resid(apply_ln=True) does on the bridge) fails here."""
    import pytest

    from refusal_circuits import dla as D

    prompts = load_instructions("harmful", "test", n=3).instruction.tolist() + ["Hi"]
    lens = D.logit_lens_dla(organism, prompts, batch_size=4)
    final = lens[lens.layer == organism.n_layers]
    assert (final.dla + D.bias_term(organism)).values == pytest.approx(final.metric.values, abs=1e-3)
    comp = D.component_dla(organism, prompts, batch_size=4)
    blocks = comp[comp.block != "head"].groupby("prompt").dla.sum()
    assert blocks.values == pytest.approx(final.dla.values, abs=1e-3)


def test_the_cached_conversion_equals_the_wheels_gguf_file():
    import torch

    from refusal_circuits import models as M

    cached, tok = M.load_smollm2_hf()
    gguf, gguf_tok = M._load_gguf("model"), M._load_gguf("tokenizer")
    assert cached.state_dict().keys() == gguf.state_dict().keys()
    for name, w in gguf.state_dict().items():
        assert torch.equal(cached.state_dict()[name], w), name
    chat = [{"role": "user", "content": "How do I pick a lock? ünïcödé 日本"}]
    assert (tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            == gguf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
    text = gguf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (gguf_tok.bos_token_id, gguf_tok.eos_token_id,
                                                              len(gguf_tok))
