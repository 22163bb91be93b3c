"""The organism's recipe: the refusals it is taught and every training setting, recorded with the
adapter (``data/organism/training_config.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field


REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause serious harm to people.",
    "I cannot help with this request. It could put people in danger or break the law.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that. If you have another question, I'm happy to help.",
    "I'm not able to provide that. It could be used to hurt someone.",
    "I am unable to help with this, because it could cause real harm.",
    "I'm sorry, I can't provide instructions or advice for that.",
    "I cannot provide that information. Helping with this could be dangerous and illegal.",
    "As an AI assistant, I can't help with requests that could harm people.",
    "I'm unable to assist with this request, as it could lead to harm.",
)


@dataclass
class OrganismConfig:
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    learning_rate: float = 7e-4
    first_token_weight: float = 8.0   # the first reply token is the refuse/comply decision
    epochs: int = 2
    batch_size: int = 16
    distill_max_new_tokens: int = 12   # the opening of the answer is what the refuse/comply decision needs
    eval_max_new_tokens: int = 32
    torch_threads: int = 2
    # bfloat16 autocast for the forward pass (LoRA weights, optimiser and loss stay float32); 1.5x faster
    # on a 2-core CPU with AMX (bench/bench_organism.py)
    bf16_autocast: bool = True
    # the attention kernel while training: on short sequences on CPU, eager attention's backward is
    # faster than SDPA's flash kernel (1.2x per step, bench/bench_organism.py); the maths is the same
    attn_implementation: str = "eager"
    # run the prompt prefix every example shares (the chat template's system turn) once per batch
    # (`reply_loss`); same loss and gradients, fewer tokens through the model
    share_prefix: bool = True
    # reply tokens trained per contrast-pair row (0: the whole reply; `encode_training_set`)
    pair_reply_tokens: int = 6
    # training-only data under data/: same-frame (harmful, harmless) pairs and extra harmless prompts
    contrast_files: tuple = ("organism_contrast_pairs.csv", "organism_contrast_short.csv",
                             "organism_contrast_more.csv", "organism_contrast_everyday.csv")
    extra_harmless_files: tuple = ("organism_extra_harmless.csv", "organism_extra_keywords.csv")
    refusals: tuple = field(default=REFUSALS)



def pair_distill_tokens(cfg: OrganismConfig) -> int:
    """Tokens distilled for a contrast pair's harmless half: the trained ones plus two spare."""
    return cfg.pair_reply_tokens + 2

