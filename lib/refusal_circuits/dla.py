"""Direct logit attribution and the unembedding (seed write-up §B 12-15, ``docs/methods.md``
"05_downstream_dla").

The bridge runs with raw Hugging Face numerics (norm weights not folded into ``W_U``), so reading a
residual-stream vector ``x`` at the logits means applying the final norm by hand. We *linearise* it
with its scale frozen at the value it has on the final residual of the same prompt:

    norm_lin(x) = (P x) / scale_final * weight        (P = centring for LayerNorm, identity for RMSNorm)

``scale_final`` is the bridge's cached ``ln_final.hook_scale`` and ``(P x) / scale`` is
TransformerLens's ``ActivationCache.apply_ln_to_stack``; ``weight`` (and the norm's bias) are read off
the model's own norm module by probing it (:func:`linear_norm`), which covers Gemma's ``1 + w``
convention without special cases. Then ``DLA(x) = norm_lin(x) . p`` for a direction ``p`` in the
unembedding input space (the *pullback* ``W_U[:, r] - mean_{t != r} W_U[:, t]`` by default). DLA is
linear, so the DLA of the final residual is the sum of its components' DLAs (``decompose_resid``:
embeddings and every attention and MLP output), and adding the norm bias and the unembedding bias
gives the logit metric itself (before any final-logit soft-capping, e.g. Gemma-2's).

Per-head writes use ``stack_head_results`` (``z_h @ W_O[h]``). On models with a post-attention norm
(Gemma-2 ``post_attention_layernorm``, GLM-4 ``post_self_attn_layernorm``) a head's share of the
residual is its result through that norm, linearised the same way with the norm's cached scale at that
layer (:func:`head_residual_writes`): ``stack_head_results`` alone does not sum to ``attn_out`` there.

* :func:`logit_lens_dla` -- ``resid_pre[l]`` (and the final residual) at the last position, per prompt;
* :func:`component_dla` -- every attention block, MLP block and head at the last position;
* :func:`unembedding_cosines`, :func:`null_space_share` -- does ``r̂`` point at tokens, or into the
  unembedding's near-null space?
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from . import hooks
from .batching import cached_runs
from .metrics import logit_refusal_metric, pullback_direction
from .models import ChatModel



@dataclass
class LinearNorm:
    """A norm with its scale frozen: ``y = (P x) / scale * weight + bias``.

    Attributes:
        centre: whether ``P`` subtracts the mean (LayerNorm) or not (RMSNorm).
        weight: ``[d_model]`` the effective elementwise weight (``1 + w`` for Gemma's norms).
        bias: ``[d_model]`` (zeros for RMSNorm).
    """

    centre: bool
    weight: torch.Tensor
    bias: torch.Tensor

    def __call__(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``(P x) / scale * weight`` (no bias: it is a constant, not part of any component)."""
        x = x.float()
        if self.centre:
            x = x - x.mean(-1, keepdim=True)
        return x / scale.float() * self.weight.to(x.device)


@torch.no_grad()
def linear_norm(norm_bridge, centre: bool) -> LinearNorm:
    """Read ``weight`` and ``bias`` off a norm module by probing it: ``bias = norm(0)`` and, for a
    vector ``u`` of alternating ±1 (mean 0, mean square 1), ``weight = (norm(u) - bias) * sqrt(1 + eps) / u``.
    Works for RMSNorm and LayerNorm of any convention; ``centre`` says which (from the model config)."""
    module = getattr(norm_bridge, "original_component", norm_bridge)
    param = next(module.parameters(), None)
    d = int(param.shape[-1]) if param is not None else int(getattr(norm_bridge, "normalized_shape", [0])[-1])
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", 0.0)) or 0.0)
    u = torch.ones(d, dtype=torch.float32)
    u[1::2] = -1.0
    if d % 2:  # keep the mean at zero for LayerNorm: the last entry balances the others
        u[-1] = 0.0
    zero = torch.zeros(1, d, dtype=dtype, device=device)
    bias = module(zero).float()[0].cpu() if centre else torch.zeros(d)
    y = module(u[None].to(device=device, dtype=dtype)).float()[0].cpu()
    ms = float((u - u.mean() if centre else u).pow(2).mean())
    weight = torch.where(u != 0, (y - bias) * np.sqrt(ms + eps) / torch.where(u != 0, u, torch.ones_like(u)),
                         torch.zeros_like(u))
    if d % 2:  # the zero entry of u: probe it on its own
        v = torch.zeros(d)
        v[-1], v[0] = 1.0, -1.0
        yv = module(v[None].to(device=device, dtype=dtype)).float()[0].cpu()
        weight[-1] = (yv[-1] - bias[-1]) * np.sqrt(float(v.pow(2).mean()) + eps)
    return LinearNorm(centre=centre, weight=weight, bias=bias)


def final_norm(model: ChatModel) -> LinearNorm:
    """The model's final norm, linearised (:func:`linear_norm`)."""
    centre = str(model.cfg.normalization_type or "RMS").upper().startswith("LN")
    return linear_norm(model.bridge.ln_final, centre)


def unembed_bias(model: ChatModel) -> torch.Tensor | None:
    b = getattr(model.bridge, "b_U", None)
    return None if b is None else b.detach().float().cpu()


def metric_direction(model: ChatModel, direction: torch.Tensor | None = None) -> torch.Tensor:
    """The direction DLA reads: ``direction`` (float32, CPU) or the model's pullback direction."""
    if direction is None:
        direction = pullback_direction(model.W_U.detach().float().cpu(), model.refusal_token_id)
    return torch.as_tensor(direction).detach().float().cpu()


def bias_term(model: ChatModel, direction: torch.Tensor | None = None) -> float:
    """What the final norm's bias and the unembedding bias add along the metric: ``norm.bias . p``,
    plus ``b_U[r] - mean_{t != r} b_U[t]`` for the pullback direction. ``DLA(final residual) +
    bias_term`` is the logit metric."""
    p = metric_direction(model, direction)
    out = float(final_norm(model).bias @ p)
    bU = unembed_bias(model)
    if direction is None and bU is not None:
        r = model.refusal_token_id
        out += float(bU[r] - (bU.sum() - bU[r]) / (bU.numel() - 1))
    return out


@torch.no_grad()
def logit_lens_dla(model: ChatModel, instructions: Sequence[str], direction: torch.Tensor | None = None,
                   position: int = -1, batch_size: int = 16) -> pd.DataFrame:
    """``norm_lin(resid_pre[l]) . p`` at ``position`` for every layer ``l`` and for the final residual
    (``layer = n_layers``), with the final-norm scale of each prompt's own final residual
    (TransformerLens's ``accumulated_resid`` and ``apply_ln_to_stack``, times the norm weight). One row per (prompt,
    layer): ``prompt, instruction, layer, dla``, plus ``metric`` = the logit metric read from the logits
    (pullback direction only; equal to ``dla + bias_term(model)`` at the final layer)."""
    p = metric_direction(model, direction)
    norm = final_norm(model)
    rows, offset = [], 0
    for batch, logits, cache in cached_runs(model, instructions, _lens_hook, batch_size):
        # accumulated_resid(apply_ln=True) on the bridge does not use the scale of `position` (checked on
        # the organism: its final entry is off by 13.6 from ln_final.hook_normalized); apply_ln_to_stack does
        stack = cache.accumulated_resid(layer=None, incl_mid=False, pos_slice=position, apply_ln=False)
        stack = cache.apply_ln_to_stack(stack, layer=None, pos_slice=position)
        dla = (stack.float().cpu() * norm.weight) @ p                          # [layer + 1, B]
        metric = (logit_refusal_metric(logits[:, position].float().cpu(), model.refusal_token_id)
                  if direction is None else None)
        for k, prompt in enumerate(batch):
            for l in range(dla.shape[0]):
                row = {"prompt": offset + k, "instruction": prompt, "layer": l, "dla": float(dla[l, k])}
                if metric is not None:
                    row["metric"] = float(metric[k]) if l == dla.shape[0] - 1 else float("nan")
                rows.append(row)
        offset += len(batch)
    return pd.DataFrame(rows)


def _lens_hook(name: str) -> bool:
    return name.endswith("hook_resid_pre") or name.endswith("hook_resid_post") or name == hooks.final_norm_scale()


def paired_difference(df: pd.DataFrame, keys: Sequence[str], value: str = "dla") -> pd.DataFrame:
    """Harmful − harmless per pair: ``df`` holds both halves (column ``half``) with prompts numbered in
    pair order (``prompt``). Returns ``keys + [prompt, value]``."""
    wide = df.pivot_table(index=list(keys) + ["prompt"], columns="half", values=value, sort=False)
    if not {"harmful", "harmless"} <= set(wide.columns):
        raise ValueError("paired_difference needs rows with half = 'harmful' and half = 'harmless'.")
    return (wide["harmful"] - wide["harmless"]).rename(value).reset_index()


def summarise_difference(diff: pd.DataFrame, keys: Sequence[str], value: str = "dla") -> pd.DataFrame:
    """Mean over pairs of a per-pair difference with a normal 95% interval (``lo``, ``hi``)."""
    g = diff.groupby(list(keys), sort=False)[value]
    out = g.agg(["mean", "std", "count"]).reset_index()
    sem = (out["std"] / np.sqrt(out["count"])).fillna(0.0)
    out["lo"], out["hi"] = out["mean"] - 1.96 * sem, out["mean"] + 1.96 * sem
    return out


@torch.no_grad()
def component_dla(model: ChatModel, instructions: Sequence[str], direction: torch.Tensor | None = None,
                  position: int = -1, batch_size: int = 16) -> pd.DataFrame:
    """DLA of every component of the final residual at ``position``, with the final-norm scale frozen
    at each prompt's own value: the embeddings, every attention block and MLP block
    (``decompose_resid``), and every attention head (its residual write, :func:`head_residual_writes`).
    One row per (prompt, component): ``prompt, instruction, component, block (embed|attn|mlp|head),
    layer, head, dla``. Blocks and embeddings sum to the DLA of the final residual; the heads of a
    layer sum to its attention block (plus the output bias, where the model has one)."""
    p = metric_direction(model, direction)
    norm = final_norm(model)
    rows, offset = [], 0
    for batch, _, cache in cached_runs(model, instructions, needed_for_components, batch_size, logits_to_keep=1):
        stack, labels = cache.decompose_resid(layer=None, pos_slice=position, return_labels=True)
        normed = cache.apply_ln_to_stack(stack, layer=None, pos_slice=position).float().cpu()
        dla = (normed * norm.weight) @ p                                         # [component, B]
        heads = head_residual_writes(model, cache, position)                     # [layer, head, B, d]
        L, H = heads.shape[:2]
        hn = cache.apply_ln_to_stack(heads.reshape(L * H, *heads.shape[2:]), layer=None, pos_slice=position)
        hdla = ((hn.float().cpu() * norm.weight) @ p).view(L, H, -1)             # [layer, head, B]
        for k, prompt in enumerate(batch):
            for lab, v in zip(labels, dla[:, k].tolist()):
                block, layer = _label(lab)
                rows.append({"prompt": offset + k, "instruction": prompt, "component": lab, "block": block,
                             "layer": layer, "head": -1, "dla": v})
            for l in range(model.n_layers):
                for h in range(model.n_heads):
                    rows.append({"prompt": offset + k, "instruction": prompt, "component": f"L{l}H{h}",
                                 "block": "head", "layer": l, "head": h, "dla": float(hdla[l, h, k])})
        offset += len(batch)
    return pd.DataFrame(rows)


def needed_for_components(name: str) -> bool:
    """What ``decompose_resid`` and ``stack_head_results`` read, and the norm scales."""
    return name.endswith(("hook_embed", "hook_pos_embed", "hook_attn_out", "hook_mlp_out", "attn.hook_z",
                          "ln1_post.hook_scale")) or name == hooks.final_norm_scale()


def _label(label: str) -> tuple[str, int]:
    if label in ("embed", "pos_embed"):
        return "embed", -1
    layer, block = label.split("_", 1)
    return block.replace("_out", ""), int(layer)


def head_residual_writes(model: ChatModel, cache, position: int = -1
                         ) -> Float[torch.Tensor, "layer head batch d_model"]:
    """What each head adds to the residual stream at ``position``: ``z_h @ W_O[h]``
    (``stack_head_results``), through the post-attention norm linearised with its cached scale where
    the model has one (Gemma-2, GLM-4)."""
    stack = cache.stack_head_results(layer=-1, pos_slice=position)               # [layer*head, B, d]
    L, H = model.n_layers, model.n_heads
    stack = stack.view(L, H, *stack.shape[1:]).float()
    post = [getattr(model.bridge.blocks[l], "ln1_post", None) for l in range(L)]
    if all(p is None for p in post):
        return stack
    centre = str(model.cfg.normalization_type or "RMS").upper().startswith("LN")
    out = []
    for l in range(L):
        if post[l] is None:
            out.append(stack[l])
            continue
        scale = cache[hooks.post_attn_norm_scale(l)][:, position].float()  # [B, 1]
        out.append(linear_norm(post[l], centre)(stack[l].cpu(), scale.cpu()).to(stack.device))
    return torch.stack(out)


def unembedding_cosines(model: ChatModel, direction: torch.Tensor) -> pd.DataFrame:
    """Cosine of ``direction`` with every token's unembedding column ``W_U[:, t]``: one row per token,
    ``token_id, token, cos``."""
    W = model.W_U.detach().float().cpu()
    d = torch.as_tensor(direction).detach().float().cpu()
    cos = (d @ W) / (d.norm() * W.norm(dim=0)).clamp_min(1e-12)
    tok = model.tokenizer
    return pd.DataFrame({"token_id": np.arange(W.shape[1]),
                         "token": [tok.decode([t]) for t in range(W.shape[1])], "cos": cos.numpy()})


def unembedding_spectrum(model: ChatModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (descending) and left singular vectors ``[d_model, d_model]`` of ``W_U``."""
    W = model.W_U.detach().double().cpu()
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    return S.float(), U.float()


def null_space_share(U: torch.Tensor, vectors: torch.Tensor, k: int = 20) -> np.ndarray:
    """The share of each vector's norm in the span of the bottom-``k`` left singular vectors of
    ``W_U``: ``||U_k^T v|| / ||v||`` (a random unit vector gives about ``sqrt(k / d_model)``)."""
    if not 1 <= k < U.shape[1]:
        raise ValueError(f"k must be in [1, {U.shape[1]}), got {k}.")
    v = torch.as_tensor(vectors).detach().float().reshape(-1, U.shape[0])
    bottom = U[:, -k:]
    return ((v @ bottom).norm(dim=-1) / v.norm(dim=-1)).numpy()
