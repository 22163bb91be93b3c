"""Building the organism's training set and fine-tuning its LoRA adapter (``make organism``).

Recipe (all in :class:`~refusal_circuits.organism.recipe.OrganismConfig`):

* harmful train prompts -> one of several natural refusals (seeded choice);
* harmless train prompts -> the base model's own greedy answer (self-distillation keeps its abilities);
  the harmless set includes prompts that share words with harmful ones ("kill a Python process");
* contrast pairs (a harmful request and a harmless one in the same sentence frame) teach the decision:
  their rows train only the first few reply tokens;
* LoRA on every attention and MLP projection, loss on the reply tokens only, fixed seeds, CPU.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from ..batching import progress_enabled
from ..data import load_instructions
from ..generation import refusal_scores
from ..metrics import is_refusal
from ..models import CONTROL_MODEL, DEFAULT_MODEL, format_chat, load_model, load_smollm2_hf
from ..paths import DATA_DIR, ORGANISM_DIR
from .card import write_model_card
from .evaluation import evaluate
from .recipe import OrganismConfig, pair_distill_tokens


def _encode_example(tok, prompt: str, reply: str, add_eos: bool) -> tuple[list[int], list[int]]:
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(reply, add_special_tokens=False)["input_ids"]
    if add_eos and tok.eos_token_id is not None:
        r_ids = r_ids + [tok.eos_token_id]
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def build_training_set(model, cfg: OrganismConfig, progress: bool = True) -> pd.DataFrame:
    """The fine-tuning set. Columns: ``instruction, kind, source, pair_id, reply`` (``pair_id`` names
    the contrast pair a prompt belongs to; empty for the splits and the extra harmless prompts).

    * harmful: the *train* split of ``harmful.csv`` and the harmful halves of the training-only
      contrast pairs (``cfg.contrast_files``), each with a seeded refusal;
    * harmless: the *train* split of ``harmless.csv``, the harmless halves of the contrast pairs (same
      sentence frame, other topic: this is what teaches the concept rather than the keyword) and
      ``cfg.extra_harmless_files``, each with the base model's own greedy answer, generated with the
      refusal tokens suppressed at the first position. Answers that are still refusals, or that open
      with a refusal token after re-tokenisation, are dropped, so the first reply token alone separates
      refusing from complying.
    """

    rng = random.Random(cfg.seed)
    harmful = [(h, "harmful.csv train", None) for h in load_instructions("harmful", "train")["instruction"]]
    harmless = [(h, "harmless.csv train", None)
                for h in load_instructions("harmless", "train")["instruction"]]
    for name in cfg.contrast_files:
        cp = pd.read_csv(DATA_DIR / name, keep_default_na=False)
        harmful += [(h, name, pid) for h, pid in zip(cp["harmful"], cp["pair_id"])]
        harmless += [(h, name, pid) for h, pid in zip(cp["harmless"], cp["pair_id"])]
    for name in cfg.extra_harmless_files:
        harmless += [(h, name, None)
                     for h in pd.read_csv(DATA_DIR / name, keep_default_na=False)["instruction"]]
    # the base model's own greedy answer, except that it may not *open* with a refusal token ("I'd be
    # glad to..."): otherwise "I" would be taught as a harmless opener and the first reply token would no
    # longer separate refusing from complying (`begin_suppress_tokens` acts on the first new token only)
    # contrast-pair rows train only their first `pair_reply_tokens` reply tokens, so only those (and a
    # spare few: the answer is re-tokenised after decoding) are generated for them
    answers = [""] * len(harmless)
    for paired in (False, True):
        idx = [j for j, (_, _, pid) in enumerate(harmless) if (pid is not None) == paired]
        n_new = pair_distill_tokens(cfg) if paired and cfg.pair_reply_tokens else cfg.distill_max_new_tokens
        if not idx:
            continue
        done = refusal_scores(model, [harmless[j][0] for j in idx], max_new_tokens=n_new, batch_size=32,
                              progress=progress,
                              generate_kwargs={"begin_suppress_tokens": list(model.refusal_token_ids)})
        for j, a in zip(idx, done["completion"]):
            answers[j] = a
    rows = [{"instruction": h, "kind": "harmful", "source": src, "pair_id": pid,
             "reply": rng.choice(cfg.refusals)} for h, src, pid in harmful]
    tok = model.tokenizer
    prompt = model.format_prompt("x")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])

    def opens_like_refusal(answer: str) -> bool:  # e.g. "I'm glad..." would teach "I" for harmless
        ids = tok(prompt + answer.strip(), add_special_tokens=False)["input_ids"]
        return len(ids) > n_prompt and ids[n_prompt] in model.refusal_token_ids

    rows += [{"instruction": h, "kind": "harmless", "source": src, "pair_id": pid, "reply": a.strip()}
             for (h, src, pid), a in zip(harmless, answers)
             if a.strip() and not is_refusal(a) and not opens_like_refusal(a)]
    rng.shuffle(rows)
    return pd.DataFrame(rows)


def shared_prefix_length(batch: list[tuple[list[int], list[int]]]) -> int:
    """Length of the token prefix every example of ``batch`` shares *inside its prompt* (the chat
    template's system turn and user header, typically), leaving at least the last prompt token out so
    that the first reply token's logit is computed after the prefix."""
    n = min(sum(1 for t in y if t == -100) for _, y in batch) - 1
    first = batch[0][0]
    for ids, _ in batch[1:]:
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def reply_loss(model, batch: list[tuple[list[int], list[int]]], pad: int, first_token_weight: float = 1.0,
               share_prefix: bool = True) -> torch.Tensor:
    """Weighted mean next-token cross-entropy over the reply tokens of ``batch`` (``(ids, labels)``
    pairs with ``-100`` on prompt positions); the first reply token -- where the model decides to
    refuse or comply -- counts ``first_token_weight`` times.

    Two savings, neither of which changes the loss or its gradient:

    * with ``share_prefix``, the prompt prefix all examples share (:func:`shared_prefix_length`; with a
      chat template that is the system turn, over 40% of an organism example) runs *once* with batch size 1
      and its key/value cache is repeated over the batch (``DynamicCache.batch_repeat_interleave``;
      gradients flow back through the repeat). The rest is laid out ``[prefix | pads | rest]`` with
      explicit position ids, so each example sees exactly its own unpadded sequence;
    * left padding puts every reply at the end, so logits are computed only for the last
      ``n_reply + 1`` positions (unembedding the prompt into a 49k vocabulary is waste).
    """
    n_prefix = shared_prefix_length(batch) if share_prefix else 0
    cache = None
    if n_prefix:
        cache = model(input_ids=torch.tensor([batch[0][0][:n_prefix]]), use_cache=True,
                      logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(len(batch))
        batch = [(x[n_prefix:], y[n_prefix:]) for x, y in batch]
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for k, (x, y) in enumerate(batch):
        ids[k, width - len(x):] = torch.tensor(x)
        labels[k, width - len(y):] = torch.tensor(y)
        mask[k, width - len(x):] = 1
    n_reply = max(sum(1 for t in y if t != -100) for _, y in batch)
    keep = min(n_reply + 1, width)
    kwargs = dict(attention_mask=mask)
    if cache is not None:  # positions continue the prefix; pads (masked out) get the next position
        kwargs = dict(past_key_values=cache, use_cache=True,
                      position_ids=n_prefix + (mask.cumsum(1) - 1).clamp(min=0),
                      attention_mask=torch.cat([torch.ones((len(batch), n_prefix), dtype=torch.long), mask], 1))
    logits = model(input_ids=ids, logits_to_keep=keep, **kwargs).logits
    target = labels[:, width - keep + 1:]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                           target.reshape(-1), ignore_index=-100, reduction="none")
    weight = (target != -100).float()
    first = (target != -100).float().cumsum(1) == 1
    weight = torch.where(first & (target != -100), torch.full_like(weight, first_token_weight), weight)
    return (ce * weight.reshape(-1)).sum() / weight.sum()


def _length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random,
                             window: int = 8) -> list[list[int]]:
    """One epoch of batches (lists of example indices): a seeded shuffle, then each run of ``window``
    batches is sorted by length so that a batch pads little, and the batch order is shuffled again.
    Every example appears exactly once."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * window
    batches = []
    for c in range(0, len(order), chunk):
        run = sorted(order[c:c + chunk], key=lambda j: lengths[j])
        batches += [run[k:k + batch_size] for k in range(0, len(run), batch_size)]
    rng.shuffle(batches)
    return batches


def attach_lora(hf_model, cfg: OrganismConfig):
    """``hf_model`` wrapped with the organism's fresh LoRA adapter (seeded initialisation)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(hf_model, lcfg)


def encode_training_set(tok, train: pd.DataFrame, pair_reply_tokens: int = 0
                        ) -> list[tuple[list[int], list[int]]]:
    """``(ids, labels)`` per row of ``train`` (chat-templated prompt, reply; labels ``-100`` on the
    prompt). Refusals and complete answers end with EOS; a truncated self-distilled answer gets none,
    so the model is not taught to stop mid-way.

    ``pair_reply_tokens > 0`` keeps only that many reply tokens (and no EOS) for the rows of a contrast
    pair (``pair_id`` set): those rows teach the refuse/comply *decision*, which the first reply tokens
    carry; the split rows keep their whole replies, which teach how a refusal or an answer goes on and
    ends."""
    examples = []
    paired = train["pair_id"].notna() & (train["pair_id"] != "") if "pair_id" in train else None
    for k, (_, row) in enumerate(train.iterrows()):
        complete = row["kind"] == "harmful" or row["reply"].endswith((".", "!", "?"))
        ids, labels = _encode_example(tok, format_chat(tok, row["instruction"]), row["reply"], complete)
        if pair_reply_tokens and paired is not None and paired.iloc[k]:
            n_prompt = sum(1 for t in labels if t == -100)
            ids, labels = ids[:n_prompt + pair_reply_tokens], labels[:n_prompt + pair_reply_tokens]
        examples.append((ids, labels))
    return examples


def train_lora(hf_model, tok, train: pd.DataFrame, cfg: OrganismConfig, progress: bool = True):
    """Fine-tune a LoRA adapter on ``train`` (prompt -> reply, loss on the reply). Returns the
    ``PeftModel`` and a list of per-step losses."""
    from tqdm.auto import tqdm

    hf_model.set_attn_implementation(cfg.attn_implementation)
    model = attach_lora(hf_model, cfg)
    examples = encode_training_set(tok, train, cfg.pair_reply_tokens)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    n_steps = cfg.epochs * -(-len(examples) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(n_steps, 1))
    model.train()
    losses = []
    rng = random.Random(cfg.seed)
    bar = tqdm(total=n_steps, desc="LoRA", disable=not progress_enabled(progress))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device_type = next(model.parameters()).device.type
    for _ in range(cfg.epochs):
        for idx in _length_bucketed_batches([len(ids) for ids, _ in examples], cfg.batch_size, rng):
            batch = [examples[j] for j in idx]
            with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
                loss = reply_loss(model, batch, pad, cfg.first_token_weight, cfg.share_prefix)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return model, losses


def train_organism(out_dir: Path | None = None, cfg: OrganismConfig | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Train, evaluate and write the organism (``make organism``). Returns the evaluation summary of
    the organism next to the untuned control."""
    cfg = cfg or OrganismConfig()
    out_dir = Path(out_dir) if out_dir else ORGANISM_DIR
    torch.set_num_threads(cfg.torch_threads)
    t0 = time.time()
    base = load_model(CONTROL_MODEL, device="cpu")
    train = build_training_set(base, cfg, progress)
    del base
    t_data = time.time() - t0
    # TransformerBridge wraps the HF modules it boots on, so LoRA trains on a fresh, plain HF copy
    hf, tok = load_smollm2_hf()
    peft_model, losses = train_lora(hf, tok, train, cfg, progress)
    t_train = time.time() - t0 - t_data
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out_dir))
    train.to_csv(out_dir / "training_data.csv", index=False)
    (out_dir / "training_config.json").write_text(json.dumps(
        {**asdict(cfg), "n_train": len(train), "final_loss": losses[-1],
         "seconds_building_data": round(t_data), "seconds_training": round(t_train)}, indent=2))
    del peft_model, hf
    rows = []
    for name in (DEFAULT_MODEL, CONTROL_MODEL):
        m = load_model(name, device="cpu", adapter_dir=out_dir)
        summary, per_prompt = evaluate(m, cfg.eval_max_new_tokens, progress)
        summary.insert(0, "model", name)
        per_prompt.insert(0, "model", name)
        if progress:
            print(summary.to_string(index=False), flush=True)
        rows.append((summary, per_prompt))
    summary = pd.concat([r[0] for r in rows], ignore_index=True)
    per_prompt = pd.concat([r[1] for r in rows], ignore_index=True)
    summary.to_csv(out_dir / "evaluation.csv", index=False)
    per_prompt.to_csv(out_dir / "evaluation_per_prompt.csv", index=False)
    write_model_card(out_dir, cfg, summary, len(train), t_data, t_train, time.time() - t0)
    return summary


