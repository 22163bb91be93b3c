"""Organism fine-tune benchmark: one LoRA training step in float32 vs bfloat16 autocast, side by side.

    python bench/bench_organism.py [--steps 4] [--batch-size 16]

Both settings train the same LoRA (the organism's config) from the same seed on the same batches of the
committed training set (``data/organism/training_data.csv``), in one process, alternating
float32 / bf16 so that machine noise hits both alike. Printed: seconds per step for each, their ratio,
and the relative difference of the first-step loss (what autocast changes numerically). The last
lines are machine-readable ``key=value`` figures.
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

    def step(batch, bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = reply_loss(model, batch, pad, cfg.first_token_weight)
        loss.backward()
        model.zero_grad()
        return loss.item()

    loss0 = {bf16: step(batches[0], bf16) for bf16 in (False, True)}  # also the warm-up
    times = {False: [], True: []}
    for batch in batches[1:]:
        for bf16 in (False, True):
            t = time.perf_counter()
            step(batch, bf16)
            times[bf16].append(time.perf_counter() - t)
    fp32, bf16 = (sum(times[k]) / len(times[k]) for k in (False, True))
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, {args.steps} steps each")
    print(f"float32: {fp32:.2f} s/step   bf16 autocast: {bf16:.2f} s/step")
    print(f"speedup={fp32 / bf16:.2f}")
    print(f"loss_rel_diff={abs(loss0[True] - loss0[False]) / loss0[False]:.4f}")


if __name__ == "__main__":
    main()
