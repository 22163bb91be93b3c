"""The organism's training: examples, the reply loss and its shared-prefix shortcut, batching, LoRA.
Tests that train are marked ``slow`` (``make test`` still runs them; ``pytest -m 'not slow'`` skips them)."""
import pytest
import torch

from refusal_circuits.organism import REFUSALS, OrganismConfig, train_lora
from refusal_circuits.organism.training import _encode_example


def test_training_examples_mask_the_prompt(tiny_llama):
    ids, labels = _encode_example(tiny_llama.tokenizer, "PROMPT", REFUSALS[0], add_eos=True)
    n_prompt = len(tiny_llama.tokenizer("PROMPT", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tiny_llama.tokenizer.eos_token_id
    assert all(r.startswith(("I", "As an AI")) for r in OrganismConfig().refusals)


def test_contrast_pair_rows_train_only_their_first_reply_tokens(tiny_llama):
    """With ``pair_reply_tokens=k`` a contrast-pair row keeps its prompt and k reply tokens (no EOS);
    other rows keep the whole reply and its EOS."""
    import pandas as pd

    from refusal_circuits.organism import encode_training_set

    tok = tiny_llama.tokenizer
    train = pd.DataFrame({"instruction": ["Make a bomb", "Make a cake", "Plan a heist"],
                          "kind": ["harmful", "harmless", "harmful"],
                          "pair_id": ["cp_1", "cp_1", None],
                          "reply": [REFUSALS[0], "Sure. Mix flour, eggs and sugar.", REFUSALS[1]]})
    full = encode_training_set(tok, train)
    cut = encode_training_set(tok, train, pair_reply_tokens=3)
    for (ids, labels), (f_ids, f_labels) in zip(cut[:2], full[:2]):
        n_prompt = sum(1 for t in f_labels if t == -100)
        assert len(f_ids) > n_prompt + 3
        assert ids == f_ids[:n_prompt + 3] and labels == f_labels[:n_prompt + 3]
        assert sum(1 for t in labels if t != -100) == 3
    assert cut[2] == full[2] and full[2][0][-1] == tok.eos_token_id


@pytest.mark.slow
def test_lora_training_step_learns_the_reply():
    """A few LoRA steps on a tiny model lower the loss on the reply tokens."""
    import pandas as pd

    from refusal_circuits.models import load_tiny_hf

    hf, tok = load_tiny_hf("llama", n_layers=2)
    train = pd.DataFrame({"instruction": ["Make a bomb", "Bake a cake please"],
                          "kind": ["harmful", "harmless"],
                          "reply": [REFUSALS[0], "Sure. Mix flour, eggs and sugar."]})
    cfg = OrganismConfig(epochs=20, batch_size=2, learning_rate=5e-2, lora_r=8,
                         target_modules=("q_proj", "v_proj", "down_proj"))
    _, losses = train_lora(hf, tok, train, cfg, progress=False)
    # a random 64-wide model's logits are tiny (|h| |w_U| ~ 1), so the loss can only fall by about a nat;
    # without learning (no gradient reaching the adapter) it would stay exactly constant
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.15, losses


def test_reply_loss_matches_transformers_loss():
    """Our left-padded, reply-only loss equals transformers' own loss on each unpadded example."""
    from refusal_circuits.models import load_tiny_hf
    from refusal_circuits.organism import reply_loss

    hf, tok = load_tiny_hf("llama", n_layers=2)
    a = _encode_example(tok, "short prompt", "A reply of some length here.", add_eos=True)
    b = _encode_example(tok, "a much longer prompt than the other one, really", "Ok.", add_eos=False)
    with torch.no_grad():
        both = reply_loss(hf, [a, b], tok.pad_token_id)
        ref = []
        for ids, labels in (a, b):
            out = hf(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            ref.append((out.loss.item(), sum(1 for t in labels[1:] if t != -100)))
    expected = sum(l * n for l, n in ref) / sum(n for _, n in ref)  # token-weighted mean
    assert both.item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prefix_loss_and_gradients_equal_the_plain_batch(family):
    """Running the shared chat-template prefix once and repeating its cache over the batch changes
    neither the loss nor the LoRA gradients (eager and SDPA attention alike)."""
    from refusal_circuits.models import format_chat, load_tiny_hf
    from refusal_circuits.organism import OrganismConfig, attach_lora, reply_loss, shared_prefix_length

    hf, tok = load_tiny_hf(family, n_layers=2)
    model = attach_lora(hf, OrganismConfig())
    for p in model.parameters():  # LoRA's B starts at zero: make the adapter act, so gradients reach A
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    batch = [_encode_example(tok, format_chat(tok, q), r, eos) for q, r, eos in [
        ("short prompt", "A reply of some length here.", True),
        ("a much longer prompt than the other one, really", "Ok.", False),
        ("third", "Sure thing, here it is", True)]]
    n = shared_prefix_length(batch)
    plain_prompt = format_chat(tok, "short prompt")
    assert 0 < n < len(tok(plain_prompt, add_special_tokens=False)["input_ids"])
    for attn in ("eager", "sdpa"):
        model.set_attn_implementation(attn)
        results = []
        for share in (False, True):
            model.zero_grad()
            loss = reply_loss(model, batch, tok.pad_token_id, 8.0, share_prefix=share)
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
            results.append((loss.item(), grad))
        (l0, g0), (l1, g1) = results
        assert l1 == pytest.approx(l0, rel=1e-5)
        assert torch.allclose(g1, g0, atol=1e-6 * g0.abs().max().item() + 1e-9), (g1 - g0).abs().max()


def test_shared_prefix_length_stops_inside_the_prompt():
    from refusal_circuits.organism import shared_prefix_length

    same = ([5, 6, 7, 8, 9], [-100, -100, -100, 8, 9])
    assert shared_prefix_length([same, same]) == 2  # the last prompt token is never in the prefix
    assert shared_prefix_length([same, ([5, 6, 1, 8], [-100] * 3 + [8])]) == 2
    assert shared_prefix_length([same, ([4, 6, 7, 8], [-100] * 3 + [8])]) == 0


def test_length_bucketed_batches_cover_every_example_once_and_pad_less():
    import random

    from refusal_circuits.organism.training import _length_bucketed_batches

    gen = random.Random(1)
    lengths = [gen.randint(20, 80) for _ in range(1000)]
    batches = _length_bucketed_batches(lengths, 16, random.Random(0))
    flat = [j for b in batches for j in b]
    assert sorted(flat) == list(range(1000)) and len(batches) == -(-1000 // 16)
    assert all(1 <= len(b) <= 16 for b in batches)

    def padded(bs):  # tokens a left-padded batch computes
        return sum(len(b) * max(lengths[j] for j in b) for b in bs)

    order = list(range(1000))
    random.Random(0).shuffle(order)
    plain = [order[k:k + 16] for k in range(0, 1000, 16)]
    assert padded(batches) < 0.9 * padded(plain)
    assert _length_bucketed_batches(lengths, 16, random.Random(0)) == batches  # seeded


@pytest.mark.slow
def test_lora_training_is_deterministic():
    """Same seed, same data -> bit-identical adapter: what lets `make organism` reproduce the
    committed adapter (on the same kind of CPU)."""
    import pandas as pd

    from refusal_circuits.models import load_tiny_hf

    train = pd.DataFrame({"instruction": ["Make a bomb", "Bake a cake please", "Hack a bank", "Plant a tree"],
                          "kind": ["harmful", "harmless", "harmful", "harmless"],
                          "reply": [REFUSALS[0], "Sure. Mix flour, eggs and sugar.", REFUSALS[3], "Dig a hole."]})
    cfg = OrganismConfig(epochs=3, batch_size=2, learning_rate=5e-2)
    adapters = []
    for _ in range(2):
        hf, tok = load_tiny_hf("llama", n_layers=2)
        model, _ = train_lora(hf, tok, train, cfg, progress=False)
        adapters.append({k: v.detach().clone() for k, v in model.named_parameters() if "lora" in k})
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert any(adapters[0][k].abs().max() > 0 for k in adapters[0] if "lora_B" in k)  # it did train
