"""Hook names, in one place.

The bridge keeps TransformerLens's classic hook names (``blocks.{l}.hook_resid_pre``,
``blocks.{l}.attn.hook_z`` ...), so we build them with TransformerLens's own
:func:`~transformer_lens.utilities.components_utils.get_act_name` and add the few helpers the analyses
need (the final residual, the layer a hook belongs to). Nothing else in the library writes a hook name
as a string.

Shapes (raw bridge numerics): ``resid_pre / resid_mid / resid_post / attn_out / mlp_out`` are
``[batch, pos, d_model]``; ``z`` is ``[batch, pos, n_heads, d_head]`` per *query* head (grouped-query
models included); ``pattern`` is ``[batch, n_heads, query_pos, key_pos]``.
"""

from __future__ import annotations

import re

from transformer_lens.utilities.components_utils import get_act_name

__all__ = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "block_out", "z",
           "pattern", "final_resid", "final_norm_scale", "post_attn_norm_scale", "layer_of", "BLOCK_OUTPUTS"]


#: the two block outputs written to the residual stream, by their short names
BLOCK_OUTPUTS = ("attn", "mlp")


def resid_pre(layer: int) -> str:
    return get_act_name("resid_pre", layer)


def resid_mid(layer: int) -> str:
    return get_act_name("resid_mid", layer)


def resid_post(layer: int) -> str:
    return get_act_name("resid_post", layer)


def attn_out(layer: int) -> str:
    return get_act_name("attn_out", layer)


def mlp_out(layer: int) -> str:
    return get_act_name("mlp_out", layer)


def block_out(layer: int, block: str) -> str:
    """``attn_out`` or ``mlp_out`` of ``layer`` by the short name ``"attn"`` / ``"mlp"``."""
    if block not in BLOCK_OUTPUTS:
        raise ValueError(f"block must be one of {BLOCK_OUTPUTS}, got {block!r}.")
    return get_act_name(f"{block}_out", layer)


def z(layer: int) -> str:
    return get_act_name("z", layer)


def pattern(layer: int) -> str:
    return get_act_name("pattern", layer)


def final_resid(n_layers: int) -> str:
    """The residual stream after the last block (before the final norm)."""
    return resid_post(n_layers - 1)


def final_norm_scale() -> str:
    """The final norm's scale (``[batch, pos, 1]``: the RMS, or the standard deviation for LayerNorm)."""
    return "ln_final.hook_scale"


def post_attn_norm_scale(layer: int) -> str:
    """The scale of the norm applied to the attention output before it joins the residual stream, on
    models that have one (Gemma-2, GLM-4: the bridge's ``ln1_post``)."""
    return f"blocks.{layer}.ln1_post.hook_scale"


_LAYER = re.compile(r"^blocks\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The layer a block hook belongs to (``blocks.7.attn.hook_z`` -> 7), ``None`` for others."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None
