# %% [markdown]
# # 05 — Downstream of the refusal direction: logit lens, the unembedding, component writes
#
# How does the refusal signal reach the logits (seed write-up §B 12–15)? We read the residual stream
# through the unembedding along the **pullback direction** `p = W_U[:, r] − mean_{t≠r} W_U[:, t]`, for which
# `x · p` is the logit refusal metric of notebook 01, and test two simple mechanisms: does the refusal
# direction `r̂` point at refusal tokens (direct unembedding), or into the unembedding's near-null space?
#
# **Numerics.** The bridge runs with raw Hugging Face numerics: the final norm is not folded into `W_U`. DLA
# therefore applies the final norm by hand, *linearised*: centring (LayerNorm only), division by the norm's
# scale **frozen at its value on the same prompt's final residual** (the bridge's `ln_final.hook_scale`,
# TransformerLens's `apply_ln_to_stack`), and the norm's elementwise weight, read off the model's own norm
# module. With this, the DLA of the final residual plus the norm and unembedding bias terms is exactly the
# logit metric (before any logit soft-capping), and the DLA of every component sums to the DLA of the final
# residual (both are checked below and in the tests). Conventions: [`docs/methods.md`](../docs/methods.md),
# "05_downstream_dla".

# %% tags=["parameters"]
MODEL = "smollm2-135m-refusal"
DEVICE = "cpu"
DTYPE = "float32"
N_PAIRS = None          # toy pairs (None = every aligned pair)
NULL_K = 20             # bottom singular vectors of W_U spanning the "null space"
N_RANDOM = 1000         # random unit directions for the null-space control
TOP_TOKENS = 10
SEED = 0

# %%
# %load_ext autoreload
# %autoreload 2
import numpy as np, pandas as pd, torch
import refusal_circuits as rc
from refusal_circuits.plotting import show
model, store = rc.open_notebook(MODEL, DEVICE, DTYPE, SEED)

# %%
D = rc.dla
aligned = rc.align_pairs(model, rc.load_toy_pairs()).subset(N_PAIRS)
harmful, harmless = list(aligned.pairs.harmful), list(aligned.pairs.harmless)
choice = rc.stages.refusal_direction(model, store)          # notebook 02's direction
r_hat = choice.unit.float()
key = {"pairs": list(aligned.pairs.pair_id)}
print(f"{len(aligned)} pairs; refusal direction from layer {choice.layer}, position {choice.position}; "
      f"final norm: {'LayerNorm' if D.final_norm(model).centre else 'RMSNorm'}")

# %% [markdown]
# ## Logit lens on the pullback direction (§B 12)
#
# `resid_pre[l]` at the last position for every layer (and the final residual, layer `L`), through the
# linearised final norm, dotted with `p`. The absolute value mixes a "grammatical" effect (the refusal
# token is a plausible first word after any request) with the refusal effect; the harmful − harmless
# difference keeps only the second.

# %%
lens = store.cached("logit_lens_dla", key, lambda: pd.concat([
    D.logit_lens_dla(model, harmful).assign(half="harmful"),
    D.logit_lens_dla(model, harmless).assign(half="harmless")], ignore_index=True))
fig = rc.plotting.lines_with_band(lens, "layer", "dla", "half",
        title=f"Logit lens: resid_pre · p through the frozen final norm (layer {model.n_layers} = final) — {model.name}",
        x_label="layer (resid_pre)", y_label="DLA on the pullback direction")
show(fig, "05_logit_lens", model.slug)

# %%
lens_diff = D.paired_difference(lens, ["layer"]).assign(half="harmful − harmless")
fig = rc.plotting.lines_with_band(lens_diff, "layer", "dla", "half",
        title=f"Logit lens, harmful − harmless per pair (band ±1 std) — {model.name}",
        x_label="layer (resid_pre)", y_label="Δ DLA on the pullback direction")
show(fig, "05_logit_lens_difference", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
final = lens[lens.layer == model.n_layers]
err = (final.dla + D.bias_term(model) - final.metric).abs().max()
absolute = lens[lens.half == "harmful"].groupby("layer").dla.mean()
gap = lens_diff.groupby("layer").dla.mean()
half = int((gap > gap.iloc[-1] / 2).idxmax())
early, middle, late = model.layer_groups(3)
print(f"check: final-residual DLA + bias terms = the logit metric from the logits: {bool(err < 1e-3)} (max |error| < 1e-3)")
print("absolute DLA, harmful, at the start of each third: "
      + ", ".join(f"L{g.start} {absolute[g.start]:.1f}" for g in (early, middle, late)) + f", final {absolute.iloc[-1]:.1f}")
print(f"harmful − harmless: L{middle.start} {gap[middle.start]:.1f}, L{late.start} {gap[late.start]:.1f}, "
      f"final {gap.iloc[-1]:.1f}; half of the final difference first reached at L{half} of {model.n_layers}")
rc.reference.show("logit_lens_dla", {"finding": (
    f"harmful − harmless reaches half its final value ({gap.iloc[-1]:.1f}) at L{half} of {model.n_layers}; "
    f"absolute DLA at L{middle.start} is {absolute[middle.start]:.1f} of a final {absolute.iloc[-1]:.1f}")}, model.name);

# %% [markdown]
# ## Direct unembedding (§B 13)
#
# Cosine of `r̂` with every token's unembedding column: if the direction simply *were* a refusal token's
# unembedding, some token would have a large cosine.

# %%
cos = D.unembedding_cosines(model, r_hat)
fig = rc.plotting.cosine_histogram(cos, model.refusal_token_ids,
        title=f"cos(r̂, W_U[:, t]) over the vocabulary — {model.name}")
show(fig, "05_unembedding_cosines", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
top_pos = cos.nlargest(TOP_TOKENS, "cos")
top_neg = cos.nsmallest(TOP_TOKENS, "cos")
print("most aligned tokens:", ", ".join(f"{t!r} {c:.3f}" for t, c in zip(top_pos.token, top_pos.cos)))
print("most anti-aligned:  ", ", ".join(f"{t!r} {c:.3f}" for t, c in zip(top_neg.token, top_neg.cos)))
refusal_cos = cos.set_index("token_id").loc[model.refusal_token_ids, "cos"]
print("refusal tokens:", ", ".join(f"{model.tokenizer.decode([t])!r} {c:.3f}" for t, c in refusal_cos.items()))
rc.reference.show("direct_unembedding", {"max abs cosine": float(cos.cos.abs().max())}, model.name);

# %% [markdown]
# ## The unembedding's near-null space (§B 14)
#
# The smallest singular values of `W_U` drop steeply: directions there barely move the logits except through
# the final norm's scale. Is `r̂` concentrated there? Share of its norm in the span of the bottom-`k`
# left singular vectors, against random unit vectors (for which it is about `sqrt(k / d_model)`).

# %%
S, U = D.unembedding_spectrum(model)
share = float(D.null_space_share(U, r_hat[None], NULL_K)[0])
null = D.null_space_share(U, rc.heads.random_directions(N_RANDOM, model.d_model, SEED), NULL_K)
fig = rc.plotting.singular_values(S, NULL_K, title=f"Singular values of W_U (bottom {NULL_K} shaded) — {model.name}")
show(fig, "05_unembedding_spectrum", model.slug)

# %%
fig = rc.plotting.null_histogram(null, share, "r̂",
        title=f"Share of the norm in the bottom-{NULL_K} singular subspace: r̂ vs {N_RANDOM} random directions — {model.name}",
        x_label=f"||U_k^T v|| / ||v||  (k = {NULL_K})")
show(fig, "05_null_space_share", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
pct = float((null >= share).mean())
print(f"singular values: largest {S[0]:.1f}, median {S.median():.2f}, smallest {S[-1]:.3f} (ratio {S[0] / S[-1]:.0f}×)")
print(f"share of r̂ in the bottom-{NULL_K} span: {share:.3f}; random: {null.mean():.3f} ± {null.std():.3f} "
      f"(sqrt(k/d) = {np.sqrt(NULL_K / model.d_model):.3f}); share of random directions ≥ r̂: {pct:.2f}")
p_two = min(1.0, 2 * min(pct, float((null <= share).mean())))  # two-sided: more or less than random
print(f"two-sided p (r̂ as far from the random mean as it is, either way): {p_two:.2f}")
rc.reference.show("unembedding_null_space", {"share of r̂ in bottom-20 span": share if NULL_K == 20 else None,
    "finding": f"r̂ {share:.3f} vs random {null.mean():.3f} ± {null.std():.3f}; larger than {1 - pct:.0%} of random "
               f"directions (two-sided p {p_two:.2f})"}, model.name);

# %% [markdown]
# ## Which components write to the pullback direction (§B 15)
#
# Every attention block, MLP block and attention head at the last position, through the same frozen final
# norm, dotted with `p`: harmful − harmless per pair, mean over pairs. Blocks come from TransformerLens's
# `decompose_resid` and heads from `stack_head_results` (`z_h · W_O[h]`); on models with a post-attention
# norm (Gemma-2, GLM-4) a head's write is that result through the norm, linearised with its own cached scale,
# because `stack_head_results` alone does not sum to the attention output there.

# %%
comp = store.cached("component_dla", key, lambda: pd.concat([
    D.component_dla(model, harmful).assign(half="harmful"),
    D.component_dla(model, harmless).assign(half="harmless")], ignore_index=True))
writes = D.summarise_difference(D.paired_difference(comp, ["component", "block", "layer", "head"]),
                                ["component", "block", "layer", "head"])
block_w = writes[writes.block.isin(["attn", "mlp"])]
fig = rc.plotting.bars(block_w, "layer", "mean", "block", err_lo="lo", err_hi="hi",
        title=f"Writes to the pullback direction per block (harmful − harmless, last position) — {model.name}",
        x_label="layer", y_label="Δ DLA on p")
show(fig, "05_component_writes", model.slug)

# %%
head_w = writes[writes.block == "head"]
fig = rc.plotting.heatmap(head_w, "head", "layer", "mean",
        title=f"Writes to the pullback direction per head (harmful − harmless, last position) — {model.name}",
        x_label="head", y_label="layer", colorbar="Δ DLA")
show(fig, "05_head_writes", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
summed = comp[comp.block != "head"].groupby(["half", "prompt"]).dla.sum()
final_dla = final.set_index(["half", "prompt"]).dla
heads_vs_attn = (comp[comp.block == "head"].groupby(["half", "prompt", "layer"]).dla.sum()
                 - comp[comp.block == "attn"].set_index(["half", "prompt", "layer"]).dla)
print(f"check: blocks + embeddings sum to the final-residual DLA: {bool((summed - final_dla).abs().max() < 1e-3)}; "
      f"heads sum to their attention block: {bool(heads_vs_attn.abs().max() < 1e-3)} (max |error| < 1e-3)")
top_b = block_w.reindex(block_w["mean"].abs().sort_values(ascending=False).index)
print("largest block writers:", ", ".join(f"{b} L{l} {m:+.2f}" for b, l, m in top_b[["block", "layer", "mean"]].values[:6]))
top_h = head_w.reindex(head_w["mean"].abs().sort_values(ascending=False).index)
print("largest head writers:", ", ".join(f"L{r.layer}H{r.head} {r.mean:+.2f}" for r in top_h.head(6).itertuples()))
tot = block_w.groupby("block")["mean"].sum()
neg = top_b[(top_b.block == "mlp") & (top_b["mean"] < 0)].head(3)
print(f"summed Δ: attention {tot.get('attn', 0):.2f}, MLP {tot.get('mlp', 0):.2f}; "
      f"largest negative MLP writers: {', '.join(f'L{l}' for l in neg.layer) or 'none'}")


# %% [markdown]
# ## Conclusion
#
# The write-up's claims about how the refusal signal reaches the logits, each as a test on this model: our
# number beside the reference (from the table), the criterion, and the verdict. The null-space question is
# two-sided: `r̂` could sit in `W_U`'s near-null space more *or* less than a random direction. The
# pullback writers printed above can be read against notebook 06: an output-side DLA ranks heads by what
# they write here, which is exactly what the paper says misses the gate.

# %%
# NBVAL_CHECK_OUTPUT
C = rc.reference.Conclusion(requires=rc.stages.baseline(model, store).precondition)
C.add("the harmful − harmless DLA difference is built in the later layers",
      f"final {gap.iloc[-1]:.1f} vs {gap[late.start]:.1f} at the start of the last third; half reached at L{half} of "
      f"{model.n_layers}", f"half of the final difference is first reached at or after the middle third (L{middle.start})",
      half >= middle.start, precondition=(gap.iloc[-1] > 0, "no positive final difference to build"))
C.add("r̂ is not a token's unembedding",
      f"max |cos| {cos.cos.abs().max():.3f} over {len(cos)} tokens (Gemma ≈ "
      f"{rc.reference.value('direct_unembedding', 'max abs cosine')})", "max |cos| < 0.2", cos.cos.abs().max() < 0.2)
C.add("r̂ is no more (and no less) in W_U's near-null space than a random direction",
      f"share {share:.3f} vs random {null.mean():.3f} ± {null.std():.3f}; two-sided p {p_two:.2f} over {N_RANDOM} directions",
      "two-sided p ≥ 0.05 (p < 0.05 either way: does not hold)", p_two >= 0.05)
C.add("many components write to p, attention included",
      f"summed Δ: attention {tot.get('attn', 0):.2f}, MLP {tot.get('mlp', 0):.2f}",
      "the attention sum is at least a tenth of the MLP sum, same sign",
      np.sign(tot.get("attn", 0)) == np.sign(tot.get("mlp", 0)) and abs(tot.get("attn", 0)) >= 0.1 * abs(tot.get("mlp", 0)))
C.show()
