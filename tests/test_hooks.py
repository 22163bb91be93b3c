"""Hook names: every name the library builds exists on the bridge of every tiny architecture."""
from refusal_circuits import hooks


def test_names_exist_on_the_bridge(tiny_model):
    m = tiny_model
    available = set(m.bridge.hook_dict)
    L = m.n_layers
    built = [f(l) for l in range(L) for f in (hooks.resid_pre, hooks.resid_mid, hooks.resid_post,
                                                hooks.attn_out, hooks.mlp_out, hooks.z, hooks.pattern)]
    built += [hooks.block_out(l, b) for l in range(L) for b in hooks.BLOCK_OUTPUTS] + [hooks.final_resid(L)]
    missing = [n for n in built if n not in available]
    assert not missing, missing


def test_shapes_are_per_query_head(tiny_model):
    m = tiny_model
    ids, _ = m.to_tokens(["Tell me about apples"])
    _, cache = m.bridge.run_with_cache(ids, names_filter=[hooks.z(1), hooks.pattern(1)])
    T = ids.shape[1]
    assert cache[hooks.z(1)].shape[:3] == (1, T, m.n_heads)  # query heads, also for grouped-query models
    assert cache[hooks.pattern(1)].shape == (1, m.n_heads, T, T)


def test_layer_of():
    assert hooks.layer_of(hooks.z(7)) == 7 and hooks.layer_of(hooks.resid_pre(12)) == 12
    assert hooks.layer_of("hook_embed") is None and hooks.layer_of("ln_final.hook_scale") is None
    assert hooks.resid_pre(3) == "blocks.3.hook_resid_pre" and hooks.z(2) == "blocks.2.attn.hook_z"
    try:
        hooks.block_out(0, "mlp2")
    except ValueError as err:
        assert "attn" in str(err)
    else:
        raise AssertionError("expected a clear error")
