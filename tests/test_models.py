import pytest
import torch

from refusal_circuits import ModelLoadError, load_model
from refusal_circuits.models import layer_groups


def test_every_tiny_architecture_runs_with_hooks(tiny_model):
    m = tiny_model
    ids, mask = m.to_tokens(["Write a poem", "Hello there, how are you today?"])
    assert ids.shape[0] == 2 and (mask[:, -1] == 1).all()  # left padding: last position is real
    _, cache = m.bridge.run_with_cache(ids, attention_mask=mask)
    assert cache["blocks.0.hook_resid_pre"].shape == (2, ids.shape[1], m.d_model)
    z = cache[f"blocks.{m.n_layers - 1}.attn.hook_z"]
    assert z.shape[:3] == (2, ids.shape[1], m.n_heads)  # per query head, even with GQA
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, m.n_heads, ids.shape[1], ids.shape[1])


def test_left_padding_does_not_change_last_logits(tiny_llama):
    m = tiny_llama
    ids_pad, mask = m.to_tokens(["Hi", "Write a long story about a dragon who likes tea"])
    ids_one, _ = m.to_tokens(["Hi"])
    with torch.no_grad():
        padded = m.bridge(ids_pad, attention_mask=mask)[0, -1]
        alone = m.bridge(ids_one)[0, -1]
    assert torch.allclose(padded, alone, atol=1e-4)


def test_refusal_tokens_are_derived_from_tokenizer(tiny_llama):
    tok = tiny_llama.tokenizer
    assert tok.decode([tiny_llama.refusal_token_id]).strip() == "I"
    assert {tok.decode([t]).strip() for t in tiny_llama.refusal_token_ids} == {"I", "As"}


def test_format_prompt_uses_chat_template(tiny_llama):
    text = tiny_llama.format_prompt("Hello")
    assert "Hello" in text and text != "Hello"
    assert text.endswith(tiny_llama.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False).split("x")[-1])


def test_layer_groups_are_thirds():
    assert [list(g) for g in layer_groups(18)] == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18))]
    groups = layer_groups(30)
    assert sum(len(g) for g in groups) == 30 and groups[0].start == 0 and groups[-1].stop == 30
    with pytest.raises(ValueError):
        layer_groups(2, 3)


def test_unknown_model_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(err.value)
    assert "huggingface-cli download no-such-org/no-such-model-xyz" in msg
    assert "not in the local Hugging Face cache" in msg


def test_unknown_tiny_architecture():
    with pytest.raises(ModelLoadError, match="tiny-llama"):
        load_model("tiny-notanarch")


def test_bad_dtype_and_empty_name():
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model("tiny-llama", dtype="float8")
    with pytest.raises(ModelLoadError):
        load_model("")


def test_missing_adapter_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="make organism"):
        load_model("smollm2-135m-refusal", adapter_dir=tmp_path)
