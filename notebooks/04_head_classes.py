# %% [markdown]
# # 04 — Attention-head classes: direct, diagonal and BOS heads
#
# The write-up found that between the subject and the last position, refusal-relevant information moves
# through attention in Gemma's middle layers, and sorted those heads by their attention patterns (seed
# write-up §B 8–11). Here the layers are this model's own: the **transfer stage** of notebook 03 finds
# where the last position starts to carry the harmful information, and the heads scored are those of the
# layers that move it there (the write-up's middle third stays available: `LAYERS = "middle"`). Every
# (query) head of the window is scored on the toy pairs and classified, and three causal questions are
# asked of the classes: are they *necessary* (patching), do they *write the refusal direction*, and do they
# matter *outside the toy format*?
#
# Scores, from `hook_pattern` (`pattern[query, key]`, one slice per *query* head for grouped-query models):
#
# * **direct** = attention from the last position to the subject position;
# * **diagonal** = attention each query position pays to the position before it, averaged over the query
#   positions (so prompts of different lengths compare; the write-up summed it);
# * **BOS** = attention parked on the first position, averaged likewise (an inactive head).
#
# Definitions and conventions: [`docs/methods.md`](../docs/methods.md), "04_head_classes".

# %% tags=["parameters"]
MODEL = "smollm2-135m-refusal"
DEVICE = "cpu"
DTYPE = "float32"
LAYERS = "transfer"     # "transfer" (from notebook 03's stage), "middle" third (the write-up's), "all", or a list
THRESHOLD = 0.2         # direct / diagonal score threshold (the write-up's)
BOS_THRESHOLD = 0.5     # mean attention on the first position that marks a head as inactive
N_PAIRS = None          # toy pairs (None = every aligned pair)
MAX_BATCH = 64
N_RANDOM = 200          # random unit directions for the control of the direct-head writes
N_FORMAT = 24           # diverse harmful test prompts for the format-dependence check
MAX_NEW_TOKENS = 16       # refusals show in the first tokens
SEED = 0

# %%
# %load_ext autoreload
# %autoreload 2
import numpy as np, pandas as pd, torch
import refusal_circuits as rc
from refusal_circuits.plotting import show
model, store = rc.open_notebook(MODEL, DEVICE, DTYPE, SEED)

# %% [markdown]
# ## Head scores

# %%
H, P = rc.heads, rc.patching
aligned = rc.align_pairs(model, rc.load_toy_pairs()).subset(N_PAIRS)
if LAYERS == "transfer":
    transfer = rc.stages.transfer(model, store)
    layers = transfer.window
    print("window:", transfer.reasons["window"])
else:
    layers = H.middle_layers(model, LAYERS)
key = {"pairs": list(aligned.pairs.pair_id), "layers": layers}
scores = store.cached("head_scores", key, lambda: H.head_scores(model, aligned, layers))
summary = H.summarise_scores(scores)
classes = H.classify_heads(summary, THRESHOLD, BOS_THRESHOLD)
print(f"{len(aligned)} pairs, layers L{layers[0]}–L{layers[-1]} ({len(classes)} query heads)")

# %%
fig = rc.plotting.head_class_scatter(classes, THRESHOLD,
        title=f"Direct vs diagonal score per head (mean over both halves, ±1 std) — {model.name}")
show(fig, "04_head_scores", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
by_class = {c: H.heads_of(classes, c) for c in H.HEAD_CLASSES}
for c, hs in by_class.items():
    print(f"{c:9s} {len(hs):3d}: {', '.join(f'L{l}H{h}' for l, h in hs[:8])}{' …' if len(hs) > 8 else ''}")
top = lambda c: f"L{by_class[c][0][0]}H{by_class[c][0][1]}" if by_class[c] else None
rc.reference.show("head_classes", {"direct heads": len(by_class["direct"]), "direct head example": top("direct"),
                                   "diagonal heads": len(by_class["diagonal"]), "diagonal head example": top("diagonal"),
                                   "BOS head example": top("BOS"), "threshold": THRESHOLD}, model.name);

# %% [markdown]
# ### Example attention patterns
#
# The strongest heads of each class on the first pair's harmful half (query position on the vertical
# axis, key position on the horizontal one; the subject token is marked).

# %%
examples = [(c, hd) for c in ("direct", "diagonal", "BOS") for hd in by_class[c][:2]]
fig = rc.plotting.pattern_grid(model, aligned, examples, pair=0,
        title=f"Attention patterns of the top heads per class (pair {aligned.pairs.pair_id[0]}, harmful) — {model.name}")
show(fig, "04_head_patterns", model.slug)

# %% [markdown]
# ## Head-class patching (§B 9)
#
# Every head of a class has its `hook_z` replaced together, at all positions, by the other half's
# (noising: run harmful, patch from harmless; denoising: the reverse). Score: fraction of the way to the
# source run's metric, ratio of means over pairs, bootstrap 95% interval.

# %%
patches = H.class_patches(classes)
frames = []
for mode in ("noising", "denoising"):
    df = P.patch_sweep(model, aligned, patches, mode, max_batch=MAX_BATCH,
                       checkpoint=store.checkpoint("head_class_patching", key | {"mode": mode,
                                                   "threshold": THRESHOLD, "bos": BOS_THRESHOLD}))
    frames.append(P.summarise(df).assign(mode=mode))
class_patch = pd.concat(frames, ignore_index=True)
fig = rc.plotting.bars(class_patch, "label", "fraction", "mode", err_lo="lo", err_hi="hi", hline=0.5,
        title=f"Patching head classes: fraction moved towards the source — {model.name}",
        x_label="head class", y_label="fraction of the metric gap")
show(fig, "04_head_class_patching", model.slug)

# %%
# NBVAL_CHECK_OUTPUT
print(class_patch.pivot_table(index="label", columns="mode", values="fraction", sort=False).round(2).to_string())
frac = class_patch.set_index(["label", "mode"]).fraction
get = lambda c, m: frac.get((c, m))
rc.reference.show("head_class_patching", {
    "noising direct fraction": get("direct", "noising"), "denoising direct fraction": get("direct", "denoising"),
    "finding": f"direct + diagonal: noising {rc.reference.fmt(get('direct + diagonal', 'noising'))}, "
               f"denoising {rc.reference.fmt(get('direct + diagonal', 'denoising'))}"}, model.name);

# %% [markdown]
# ### Generations with a class patched
#
# Greedy completions with the class's `z` taken from the other half of the pair at every **prompt**
# position; the generated positions are left alone (the other prompt has no continuation to copy). Noising
# asks whether the harmful halves stop refusing; denoising whether the harmless halves start.

# %%
gen_classes = [c for c in ("direct", "direct + diagonal") if any(p.label == c for p in patches)]
class_heads = {"direct": by_class["direct"], "direct + diagonal": by_class["direct"] + by_class["diagonal"]}
rows, example = [], None
for mode, col in (("noising", "harmful"), ("denoising", "harmless")):
    base = rc.refusal_scores(model, list(aligned.pairs[col]), MAX_NEW_TOKENS, progress=False,
                             checkpoint=store.checkpoint("class_generations_base", key | {"kind": col,
                                                         "tokens": MAX_NEW_TOKENS}))
    rows.append({"patched": "none", "mode": mode, "prompts": col, "refusal rate": base.refused.mean()})
    for c in gen_classes:
        g = H.patched_generations(model, aligned, class_heads[c], mode, MAX_NEW_TOKENS,
                                  checkpoint=store.checkpoint("class_generations", key | {
                                      "class": c, "mode": mode, "tokens": MAX_NEW_TOKENS, "threshold": THRESHOLD}))
        rows.append({"patched": c, "mode": mode, "prompts": col, "refusal rate": g.refused.mean()})
        example = g.iloc[0] if example is None else example
gen_rates = pd.DataFrame(rows)
(example if example is not None else base.iloc[0])[["instruction", "completion", "refused"]].to_frame().T

# %%
# NBVAL_CHECK_OUTPUT
print(gen_rates.round(2).to_string(index=False))

# %% [markdown]
# ## Direct heads write the refusal direction (§B 10)
#
# Each head's output `z_h · W_O[h]` at the last position, projected on the refusal direction `r̂` of
# notebook 02, harmful − harmless per pair. The statistic is the mean over direct heads minus the mean over
# the other heads of the scored layers. The control repeats it for random unit directions: if direct heads
# only wrote *more of everything*, `r̂` would look like a random direction.

# %%
choice = rc.stages.refusal_direction(model, store)
direct = by_class["direct"]
dirs = torch.cat([choice.unit.float()[None], H.random_directions(N_RANDOM, model.d_model, SEED)])
writes = H.head_writes(model, aligned, dirs, layers)               # [direction, pair, layer, head]
per_head = pd.DataFrame([{"layer": l, "head": h, "label": f"L{l}H{h}",
                          "class": "direct" if (l, h) in direct else "other",
                          "write": float(writes[0, :, i, h].mean())}
                         for i, l in enumerate(layers) for h in range(model.n_heads)])
fig = rc.plotting.distribution_figure(per_head, "write", "class", hover="label",
        title=f"Differential write on r̂ (harmful − harmless, last position) per head — {model.name}",
        value_label="Δ (head output · r̂)")
show(fig, "04_direct_head_writes", model.slug)

# %%
if direct and len(direct) < len(per_head):
    stat = H.direct_vs_rest(writes, layers, direct)
    null = stat[1:]
    pct = float((null >= stat[0]).mean())
    fig = rc.plotting.null_histogram(null, stat[0], "r̂",
            title=f"Direct − other heads' differential write: r̂ vs {N_RANDOM} random directions — {model.name}",
            x_label="mean Δ write, direct heads − other heads")
    show(fig, "04_direct_head_control", model.slug)
else:
    stat, null, pct = None, None, None
    print("no direct heads at this threshold (or no other heads): nothing to compare")

# %%
# NBVAL_CHECK_OUTPUT
if stat is not None:
    print(f"direct − other on r̂: {stat[0]:.2f}; random directions: {null.mean():.2f} ± {null.std():.2f} "
          f"(share of random directions at least as large: {pct:.3f})")
    finding = (f"direct heads write r̂ {'more' if stat[0] > 0 else 'less'} than other heads ({stat[0]:.2f}); "
               f"random directions {null.mean():.2f} ± {null.std():.2f}")
else:
    finding = "no direct heads to compare"
rc.reference.show("direct_heads_write_direction", {"finding": finding}, model.name);

# %% [markdown]
# ## Format dependence (§B 11)
#
# The toy pairs share one sentence frame. On the diverse harmful *test* prompts, which have no twin, we
# replace the direct heads' `z` at the post-instruction (template) positions by its mean over harmless
# test prompts at the same positions counted from the end, and compare the generative refusal rate with
# and without the patch (generated positions left alone).

# %%
n_post = rc.direction.post_instruction_positions(model)
harmful_test = rc.load_instructions("harmful", "test", n=N_FORMAT).instruction.tolist()
harmless_test = rc.load_instructions("harmless", "test", n=N_FORMAT).instruction.tolist()
fkey = {"n": N_FORMAT, "tokens": MAX_NEW_TOKENS, "direct": [f"L{l}H{h}" for l, h in direct]}
plain = rc.refusal_scores(model, harmful_test, MAX_NEW_TOKENS, progress=False,
                          checkpoint=store.checkpoint("format_plain", fkey))
if direct:
    means = H.mean_z(model, harmless_test, direct, n_post)
    patched = rc.refusal_scores(model, harmful_test, MAX_NEW_TOKENS, progress=False,
                                fwd_hooks=H.mean_z_hooks(means),
                                checkpoint=store.checkpoint("format_patched", fkey | {"n_post": n_post}))
else:
    patched = plain
pd.DataFrame({"instruction": harmful_test, "plain": plain.completion, "direct heads patched": patched.completion}).head(3)

# %%
# NBVAL_CHECK_OUTPUT
print(f"diverse harmful test prompts (n={len(harmful_test)}), {n_post} post-instruction positions patched: "
      f"refusal rate {plain.refused.mean():.2f} plain, {patched.refused.mean():.2f} with the direct heads' mean z")
rc.reference.show("format_dependence", {"finding": (
    f"refusal rate {plain.refused.mean():.2f} → {patched.refused.mean():.2f} with the direct heads patched")}, model.name);


# %% [markdown]
# ## Conclusion
#
# The write-up's claims about head classes, each as a test on this model: our number beside the
# reference (from the table), the criterion, and the verdict. A claim about the direct heads is "not
# testable here" when there are none; the format-dependence claim needs the direct heads to matter on the
# toy format first (otherwise "barely moves on diverse prompts" says nothing). Notebook 06 reports whether
# its gate is one of this notebook's classes (it scores the gate's attention pattern the same way).

# %%
# NBVAL_CHECK_OUTPUT
C = rc.reference.Conclusion(requires=rc.stages.baseline(model, store).precondition)
n_direct, n_diag = len(by_class["direct"]), len(by_class["diagonal"])
has_direct = (n_direct > 0, "no direct head in the window")
C.add("a few direct heads sit in the layers that move the information",
      f"{n_direct} of {len(classes)} heads in L{layers[0]}–L{layers[-1]} "
      f"(Gemma: {rc.reference.value('head_classes', 'direct heads'):.0f})",
      "at least one, and at most a quarter of the heads scored", 0 < n_direct <= 0.25 * len(classes))
nd, dd = get("direct", "noising"), get("direct", "denoising")
C.add("noising the direct heads is necessary",
      f"fraction {rc.reference.fmt(nd)} (Gemma {rc.reference.value('head_class_patching', 'noising direct fraction'):g})",
      "noising fraction ≥ 0.5", nd is not None and nd >= 0.5, precondition=has_direct)
C.add("denoising the direct heads restores much of refusal",
      f"fraction {rc.reference.fmt(dd)} (Gemma {rc.reference.value('head_class_patching', 'denoising direct fraction'):g})",
      "denoising fraction ≥ 0.5", dd is not None and dd >= 0.5, precondition=has_direct)
both = get("direct + diagonal", "noising")
C.add("direct + diagonal together has less effect than direct alone",
      f"noising {rc.reference.fmt(both)} together vs {rc.reference.fmt(nd)} direct alone",
      "together < direct alone", both is not None and nd is not None and both < nd,
      precondition=(n_direct > 0 and n_diag > 0, "no direct or no diagonal head"))
C.add("direct heads write r̂ more than other heads, beyond what random directions show",
      f"direct − other {rc.reference.fmt(None if stat is None else float(stat[0]))}; share of {N_RANDOM} random directions at least as large "
      f"{rc.reference.fmt(pct)}", "share < 0.05", pct is not None and pct < 0.05,
      precondition=(stat is not None, "no direct heads (or no others) to compare"))
toy = gen_rates.set_index(["patched", "mode"])["refusal rate"]
toy_effect = (abs(toy.get(("none", "noising"), np.nan) - toy.get(("direct", "noising"), np.nan))
              if ("direct", "noising") in toy.index else None)
delta = plain.refused.mean() - patched.refused.mean()
C.add("patching the direct heads barely moves refusal on diverse prompts (format dependence)",
      f"diverse prompts: {plain.refused.mean():.2f} → {patched.refused.mean():.2f}; on the toy format the same heads "
      f"move it {rc.reference.fmt(toy_effect)}", "|Δ| ≤ 0.2 on diverse prompts, given |Δ| ≥ 0.2 on the toy format",
      abs(delta) <= 0.2,
      precondition=(n_direct > 0 and toy_effect is not None and toy_effect >= 0.2,
                    "the direct heads do not move refusal even on the toy format"))
C.show()
