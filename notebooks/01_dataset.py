# %% [markdown]
# # 01 — Datasets, the chat template and the refusal metrics
#
# This notebook introduces the data every later notebook uses and checks the two things the rest of the
# analysis stands on: **the model refuses harmful requests and answers harmless ones** (generative refusal
# score), and **the logit refusal metric separates the two** (`M = logit[r] − mean_{t≠r} logit[t]` at the
# last prompt position, with `r` the model's refusal-opening token).
#
# The default model is `smollm2-135m-refusal`, our safety-tuned SmolLM2-135M-Instruct "model organism"
# (see `data/organism/README.md`). Change `MODEL` to run the same notebook on any chat model in your
# Hugging Face cache, e.g. `google/gemma-2b-it` — the seed write-up's model.

# %% tags=["parameters"]
MODEL = "smollm2-135m-refusal"   # or "smollm2-135m-instruct" (untuned control), "google/gemma-2b-it", ...
DEVICE = "cpu"                    # "cuda", or "auto" to spread a large model over several GPUs
DTYPE = "float32"
N_PROMPTS = 24                    # held-out harmful and harmless test prompts to generate for
MAX_NEW_TOKENS = 32               # the write-up uses ~64; refusals show in the first few tokens
SEED = 0

# %%
# %load_ext autoreload
# %autoreload 2
import numpy as np, pandas as pd, torch
import refusal_circuits as rc
from refusal_circuits.plotting import show
model, store = rc.open_notebook(MODEL, DEVICE, DTYPE, SEED)

# %% [markdown]
# ## The datasets
#
# All datasets were written for this project (requests only, never harmful content); `data/README.md`
# documents them. The instruction sets have fixed train / val / test splits: the organism is trained on
# *train*, the refusal direction is selected on *val*, and everything reported is measured on *test* or on
# the pair sets, which no training step has seen.

# %%
# NBVAL_CHECK_OUTPUT
print(rc.data.datasets_overview().to_string(index=False))

# %% [markdown]
# ## Toy pairs in the chat template
#
# The seed write-up's toy pairs differ in exactly one token (*bomb* / *table*). The pair loader formats
# both halves with the model's own chat template, checks that they align token for token, and finds the
# **subject position** (the one that differs) and the **last position** (the one predicting the first
# response token) itself — nothing about the template is hard-coded.

# %%
toy = rc.load_toy_pairs()
aligned = rc.align_pairs(model, toy, on_misaligned="drop")
pairs = aligned.pairs

# %%
# NBVAL_CHECK_OUTPUT
print(f"{len(aligned)} of {len(toy)} toy pairs align token for token for {model.name}")
if len(aligned.dropped):
    print(aligned.dropped.to_string(index=False))
print("subject position counted from the end:", sorted(int(p) for p in pairs.subject_from_end.unique()))

# %%
i = 0
fig = rc.plotting.token_pair_figure(model.str_tokens(pairs.harmful[i]), model.str_tokens(pairs.harmless[i]),
                                    title=f"Toy pair {pairs.pair_id[i]} in {model.name}'s chat template")
show(fig, "01_toy_pair_tokens", model.slug)

# %% [markdown]
# ## Baseline generations
#
# Greedy completions for held-out prompts and the toy pairs, with the substring refusal flag of
# Arditi et al. (a completion refuses if it contains "I'm sorry", "I cannot", "As an AI", ...).

# %%
prompts = {
    "harmful (test)": rc.load_instructions("harmful", "test", n=N_PROMPTS).instruction.tolist(),
    "harmless (test)": rc.load_instructions("harmless", "test", n=N_PROMPTS).instruction.tolist(),
    "harmful (toy)": pairs.harmful.tolist(),
    "harmless (toy)": pairs.harmless.tolist(),
}
# the held-out prompts are the baseline stage (saved; every later conclusion asks it whether this model
# refuses), the toy pairs one more resumable run: each batch is saved as it finishes
base = rc.stages.baseline(model, store, n_prompts=N_PROMPTS, max_new_tokens=MAX_NEW_TOKENS)
toy_gens = rc.refusal_scores(model, prompts["harmful (toy)"] + prompts["harmless (toy)"],
                             max_new_tokens=MAX_NEW_TOKENS, checkpoint=store.checkpoint("toy_generations", {
                                 "max_new_tokens": MAX_NEW_TOKENS, "data": rc.data.data_hash(toy),
                                 "pairs": list(pairs.pair_id)}))
gens = pd.concat([base.table.drop(columns="kind"), toy_gens], ignore_index=True)
gens["set"] = [name for name, ps in prompts.items() for _ in ps]
gens.groupby("set", sort=False).head(2)[["set", "instruction", "completion", "refused"]]

# %%
# NBVAL_CHECK_OUTPUT
rates = gens.groupby("set", sort=False).refused.agg(["mean", "size"])
for name, row in rates.iterrows():
    print(f"{name:16s} refusal rate {row['mean']:.2f}  (n={int(row['size'])})")
rc.reference.show("baseline_generations", {"harmful toy refusal rate": rates.loc["harmful (toy)", "mean"],
                                            "harmless toy refusal rate": rates.loc["harmless (toy)", "mean"]},
                  model.name);
print(f"Does {model.name} refuse? {'yes' if base.refuses else 'no'}: {base.summary} "
      f"(the precondition of every later conclusion).")


# %% [markdown]
# ## The logit refusal metric
#
# `M = logit[r] − mean_{t≠r} logit[t]` at the last position, with `r` derived from the tokenizer as the
# commonest first token of the refusal phrases. It is linear in the final residual stream (through the
# final norm), which is why the seed write-up prefers it to the log-odds score of Arditi et al.
# (`log p(R) − log(1 − p(R))`); we compute both.

# %%
def run_metrics():
    frames = [rc.refusal_metrics(model, p).assign(set=name) for name, p in prompts.items()]
    return pd.concat(frames, ignore_index=True)
metrics = store.cached("baseline_metrics", {"n": N_PROMPTS, "data": rc.data.data_hash(toy)}, run_metrics)
fig = rc.plotting.distribution_figure(metrics, "logit_metric", "set", value_label="logit refusal metric M",
        title=f"Logit refusal metric at the last position — {model.name}")
show(fig, "01_logit_metric", model.slug)

# %%
fig = rc.plotting.distribution_figure(metrics, "log_odds", "set", value_label="log-odds refusal score",
        title=f"Log-odds refusal score (Arditi et al.) — {model.name}")
show(fig, "01_log_odds", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
summary = metrics.groupby("set", sort=False)[["logit_metric", "log_odds"]].mean().round(1)
print(summary.to_string())
toy_h = metrics.query("set == 'harmful (toy)'").logit_metric.mean()
toy_s = metrics.query("set == 'harmless (toy)'").logit_metric.mean()
rc.reference.show("toy_metric", {"harmful mean logit metric": toy_h, "harmless mean logit metric": toy_s,
                                 "harmful − harmless gap": toy_h - toy_s}, model.name);

# %% [markdown]
# ## Conclusion
#
# What the later notebooks stand on, as tests on this model: the model refuses the harmful requests more
# often than the harmless ones (one-sided Fisher exact test), and the logit metric is higher on the harmful
# prompts (the harmful − harmless mean difference, bootstrap 95% interval over prompts), on the held-out
# test prompts and on the toy pairs. The absolute values differ from gemma-2b-it's (another vocabulary and
# logit scale); what the later notebooks use is the harmful − harmless *gap*, which is what patching
# recovers.

# %%
# NBVAL_CHECK_OUTPUT
C = rc.reference.Conclusion()
for kind in ("test", "toy"):
    (k_h, n_h), (k_s, n_s) = (gens.query(f"set == '{half} ({kind})'").refused.agg(["sum", "size"])
                              for half in ("harmful", "harmless"))
    p = rc.stats.fisher_greater(int(k_h), int(n_h), int(k_s), int(n_s))
    C.add(f"it refuses harmful more often than harmless requests ({kind})",
          f"{int(k_h)}/{int(n_h)} vs {int(k_s)}/{int(n_s)}, one-sided Fisher p = {p:.2g}", "p ≤ 0.01", p <= 0.01)
    m_h, m_s = (metrics.query(f"set == '{half} ({kind})'").logit_metric.to_numpy() for half in ("harmful", "harmless"))
    gap, lo, hi = rc.stats.bootstrap(lambda a, b: a.mean(axis=-1) - b.mean(axis=-1), m_h, m_s, n_boot=2000, seed=SEED)
    C.add(f"the logit metric is higher on harmful prompts ({kind})",
          f"harmful − harmless {float(gap):.2f} [{float(lo):.2f}, {float(hi):.2f}]",
          "the 95% interval is above 0", float(lo) > 0)
C.show()
