"""Organism fine-tune benchmark: one LoRA training step in four settings, side by side: float32 (SDPA
attention), bfloat16 autocast, bf16 with the shared prompt prefix run once per batch, and that with eager
attention (the organism's recipe).

    python bench/bench_organism.py [--steps 4] [--batch-size 16]

Both settings train the same LoRA (the organism's config) from the same seed on the same batches of the
committed training set (``data/organism/training_data.csv``), in one process, alternating
the settings step by step so that machine noise hits all alike. Printed: seconds per step for each, the
ratios, and the relative difference of the first-step loss (what autocast, and the prefix sharing, change
numerically). The last lines are machine-readable ``key=value`` figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from refusal_circuits.models import load_smollm2_hf  # noqa: E402
from refusal_circuits.organism import OrganismConfig, attach_lora, encode_training_set, reply_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = OrganismConfig()
    hf, tok = load_smollm2_hf()
    model = attach_lora(hf, cfg)
    train = pd.read_csv(ROOT / "data" / "organism" / "training_data.csv", keep_default_na=False)
    ex = encode_training_set(tok, train.sample(n=args.batch_size * (args.steps + 1), random_state=0))
    batches = [ex[k:k + args.batch_size] for k in range(0, len(ex), args.batch_size)]
    pad = tok.pad_token_id

    settings = {"float32": (False, False, "sdpa"), "bf16": (True, False, "sdpa"),
                "bf16+prefix": (True, True, "sdpa"), "bf16+prefix+eager": (True, True, "eager")}

    def step(batch, bf16: bool, share_prefix: bool, attn: str) -> float:
        model.set_attn_implementation(attn)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = reply_loss(model, batch, pad, cfg.first_token_weight, share_prefix=share_prefix)
        loss.backward()
        model.zero_grad()
        return loss.item()

    loss0 = {k: step(batches[0], *v) for k, v in settings.items()}  # also the warm-up
    times = {k: [] for k in settings}
    for batch in batches[1:]:
        for k, v in settings.items():
            t = time.perf_counter()
            step(batch, *v)
            times[k].append(time.perf_counter() - t)
    sec = {k: sum(t) / len(t) for k, t in times.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, {args.steps} steps each")
    print("   ".join(f"{k}: {v:.2f} s/step" for k, v in sec.items()))
    print(f"speedup_bf16={sec['float32'] / sec['bf16']:.2f}")
    print(f"speedup_prefix={sec['bf16'] / sec['bf16+prefix']:.2f}")
    print(f"speedup_eager={sec['bf16+prefix'] / sec['bf16+prefix+eager']:.2f}")
    print(f"speedup_total={sec['float32'] / sec['bf16+prefix+eager']:.2f}")
    for k in ("bf16", "bf16+prefix", "bf16+prefix+eager"):
        print(f"loss_rel_diff_{k}={abs(loss0[k] - loss0['float32']) / loss0['float32']:.4f}")

if __name__ == "__main__":
    main()
