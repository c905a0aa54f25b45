"""PEFT pieces against a numpy re-computation of one encoder block, plus identity-at-init,
LoRA merge/unmerge, prompt-pool selection and a finite-difference gradient check."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pecft_jax.backbones import vit
from pecft_jax.peft import adapters, lora, prompt_pool, prompts, ssf
from pecft_jax.backbones.context import LORA_TARGETS, SSF_POINTS, PEFTContext

CFG = vit.get_config("ViT-Demo/7", num_layers=1, hidden_size=16, mlp_dim=24, num_heads=2)
CFG2 = CFG.replace(num_layers=2)  # for what needs a second block (deep prompts, layer indexing)
BATCH = 2
_apply = jax.jit(vit.apply, static_argnums=0, static_argnames=("output", "stop_at_layer"))


def _random_params(cfg, seed):
    """Backbone params with random values everywhere (no zero biases or unit LayerNorm scales
    to hide mistakes); shapes from eval_shape, values from numpy, so nothing compiles."""
    shapes = jax.eval_shape(lambda key: vit.init_params(cfg, key), jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: ((1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0)
                         + 0.2 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def _perturb(tree, seed, scale=0.1):
    """Add numpy noise to every leaf (e.g. to make LoRA's B or an adapter's up non-zero)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: (np.asarray(x) + scale * rng.normal(size=x.shape)).astype(np.float32), tree)


@pytest.fixture(scope="module")
def params():
    return _random_params(CFG, 1)


@pytest.fixture(scope="module")
def params2():
    return _random_params(CFG2, 2)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).normal(size=(BATCH, 28, 28, 1)).astype(np.float32)


def _forward(params, images, ctx=None, cfg=CFG):
    return np.asarray(_apply(cfg, params, images, ctx, output="tokens"), np.float64)


# ----------------------------------------------------------------------------- numpy reference
def _np(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _ln(x, p, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _bottleneck(x, p, activation="relu"):
    h = x @ p["down"]["kernel"] + p["down"]["bias"]
    if activation == "relu":
        h = np.maximum(h, 0)
    else:  # the exact GELU, x Phi(x)
        h = 0.5 * h * (1 + np.vectorize(math.erf)(h / np.sqrt(2)))
    return h @ p["up"]["kernel"] + p["up"]["bias"]


def np_embed(params, images, embed_ssf=None):
    """[CLS] + patch tokens + position embedding: the tokens entering block 0 (``embed_ssf``:
    SSF's scale and shift of the patch tokens, before [CLS] and the positions)."""
    p = _np(params)
    batch, size, _, channels = images.shape
    patch = p["embedding"]["kernel"].shape[0]
    grid = size // patch
    patches = images.astype(np.float64).reshape(batch, grid, patch, grid, patch, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, -1)
    # the conv kernel (p, p, C, D) flattens in the same (row, column, channel) order
    tokens = patches @ p["embedding"]["kernel"].reshape(-1, p["cls"].shape[-1]) + \
        p["embedding"]["bias"]
    if embed_ssf is not None:
        tokens = tokens * np.asarray(embed_ssf["scale"]) + np.asarray(embed_ssf["shift"])
    cls = np.broadcast_to(p["cls"], (batch, 1, tokens.shape[-1]))
    pos = p["Transformer"]["posembed_input"]["pos_embedding"]
    return np.concatenate([cls, tokens], axis=1) + pos


def np_final(params, x, final_ssf=None):
    x = _ln(x, _np(params["Transformer"]["encoder_norm"]))
    if final_ssf is not None:
        x = x * np.asarray(final_ssf["scale"]) + np.asarray(final_ssf["shift"])
    return x


def with_prompt(x, prompt, keep_from=1):
    """Insert (B, Lp, D) prompt tokens after [CLS], dropping tokens 1..keep_from-1."""
    return np.concatenate([x[:, :1], np.asarray(prompt, np.float64), x[:, keep_from:]], axis=1)


def np_block(x, block, *, lora_factors=None, scaling=1.0, prefix=None, ssf_params=None,
             adapter=None, adapter_attn=None, adapter_mode="sequential", adapter_scale=1.0,
             adapter_attn_parallel=False, activation="relu", compensated=False):
    """One pre-LN ViT block written from the papers' equations (float64 numpy).
    ``adapter_attn_parallel`` / ``activation='gelu'``: LAE's adapter beside the attention
    from LN1's output with an exact GELU; ``compensated``: LAE's prefix attention, the
    prefix columns divided by their sum."""
    block, lora_factors, ssf_params = _np(block), _np(lora_factors or {}), _np(ssf_params or {})
    adapter, adapter_attn = _np(adapter), _np(adapter_attn)
    batch, length, dim = x.shape
    attn = block["MultiHeadDotProductAttention_1"]
    heads = attn["query"]["kernel"].shape[1]
    head_dim = dim // heads

    def scale_shift(y, point):
        if point not in ssf_params:
            return y
        return y * ssf_params[point]["scale"] + ssf_params[point]["shift"]

    def linear(inp, kernel, bias, target):
        y = inp @ kernel.reshape(inp.shape[-1], -1) + bias.reshape(-1)
        if target in lora_factors:
            y = y + scaling * inp @ lora_factors[target]["A"] @ lora_factors[target]["B"]
        return scale_shift(y, target)

    h = scale_shift(_ln(x, block["LayerNorm_0"]), "ln1")
    q, k, v = (linear(h, attn[n]["kernel"], attn[n]["bias"], n) for n in ("query", "key", "value"))
    if prefix is not None:  # (B, 2, Lp, D)
        k = np.concatenate([prefix[:, 0], k], axis=1)
        v = np.concatenate([prefix[:, 1], v], axis=1)
    q, k, v = (t.reshape(batch, t.shape[1], heads, head_dim) for t in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    if compensated:
        n = prefix.shape[2]
        weights[..., :n] /= weights[..., :n].sum(-1, keepdims=True)
    attended = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, dim)
    out = linear(attended, attn["out"]["kernel"], attn["out"]["bias"], "out")
    if adapter_attn is not None:
        source = h if adapter_attn_parallel else out
        out = out + adapter_scale * _bottleneck(source, adapter_attn, activation)
    x = x + out
    h = scale_shift(_ln(x, block["LayerNorm_2"]), "ln2")
    mlp = block["MlpBlock_3"]
    y = _gelu_tanh(linear(h, mlp["Dense_0"]["kernel"], mlp["Dense_0"]["bias"], "fc1"))
    y = linear(y, mlp["Dense_1"]["kernel"], mlp["Dense_1"]["bias"], "fc2")
    if adapter is not None:
        y = y + adapter_scale * _bottleneck(y if adapter_mode == "sequential" else x, adapter)
    return x + y


def _block(params, layer):
    return params["Transformer"][f"encoderblock_{layer}"]


def test_numpy_reference_matches_plain_backbone(params, images):
    want = np_final(params, np_block(np_embed(params, images), _block(params, 0)))
    np.testing.assert_allclose(_forward(params, images), want, atol=5e-5)


# ----------------------------------------------------------------------------- LoRA
def test_lora_init_starts_at_base_model_then_matches_numpy(params, images):
    # rank 4 everywhere (and bottleneck 4 for adapters): equal shapes reuse compiled samplers
    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    factors = lora.init_lora(CFG, cfg, jax.random.key(3))
    assert list(factors) == ["0"] and tuple(factors["0"]) == LORA_TARGETS
    for target in LORA_TARGETS:
        d_in, d_out = lora.target_dims(CFG, target)
        a, b = np.asarray(factors["0"][target]["A"]), np.asarray(factors["0"][target]["B"])
        assert a.shape == (d_in, 4) and b.shape == (4, d_out)
        assert not b.any()
        # HF's kaiming-uniform: U(-1/sqrt(d_in), 1/sqrt(d_in))
        assert np.abs(a).max() <= 1 / math.sqrt(d_in) and a.std() > 0.3 / math.sqrt(d_in)
    np.testing.assert_array_equal(_forward(params, images, lora.lora_context(factors, cfg)),
                                  _forward(params, images))
    trained = _perturb(factors, 4, scale=0.3)
    got = _forward(params, images, lora.lora_context(trained, cfg))
    want = np_final(params, np_block(np_embed(params, images), _block(params, 0),
                                     lora_factors=trained["0"], scaling=2.0))
    np.testing.assert_allclose(got, want, atol=5e-5)


def test_lora_merge_equals_context_and_unmerge_restores(params, images):
    cfg = lora.LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS)
    factors = _perturb(lora.init_lora(CFG, cfg, jax.random.key(6)), 7, scale=0.2)
    factors = {str(layer): f for layer, f in factors.items()}  # checkpoints may string the keys
    with_context = _forward(params, images, lora.lora_context(factors, cfg))
    assert np.abs(with_context - _forward(params, images)).max() > 1e-2
    merged = lora.merge_lora(params, factors, cfg)
    np.testing.assert_allclose(_forward(merged, images), with_context, atol=1e-5)
    # the input tree is untouched (untouched leaves shared); unmerging gives its weights back
    restored = lora.unmerge_lora(merged, factors, cfg)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree_util.tree_leaves(restored)):
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert _block(merged, 0)["LayerNorm_0"]["scale"] is _block(params, 0)["LayerNorm_0"]["scale"]
    kernel = _block(params, 0)["MlpBlock_3"]["Dense_0"]["kernel"]
    np.testing.assert_allclose(
        _block(merged, 0)["MlpBlock_3"]["Dense_0"]["kernel"] - kernel,
        4.0 * np.asarray(factors["0"]["fc1"]["A"]) @ np.asarray(factors["0"]["fc1"]["B"]),
        atol=1e-6)
    with pytest.raises(ValueError, match="no Transformer/encoderblock_3"):
        lora.merge_lora(params, {3: factors["0"]}, cfg)


def test_lora_target_resolution_and_errors():
    resolve = lambda **kw: lora.resolve_targets(CFG2, lora.LoraConfig(r=2, lora_alpha=2, **kw))
    assert resolve() == {0: ("query", "value"), 1: ("query", "value")}
    assert resolve(target_modules="encoderblock_1/.*query") == {1: ("query",)}
    assert resolve(target_modules=["MlpBlock_3/Dense_[01]", "out"], layers=[0]) == {
        0: ("out", "fc1", "fc2")}
    assert lora.LoraConfig(r=8, lora_alpha=16).scaling == 2.0
    with pytest.raises(ValueError, match="matches no module.*'query', 'key'"):
        resolve(target_modules=["qkv"])
    with pytest.raises(ValueError, match="valid regular expression"):
        resolve(target_modules=["query("])
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        resolve(layers=[5])
    with pytest.raises(ValueError, match="selects no module"):
        resolve(target_modules="encoderblock_1/.*query", layers=[0])
    shapes = jax.eval_shape(lambda k: lora.init_lora(CFG, lora.LoraConfig(r=2, lora_alpha=2), k),
                            jax.random.key(0))
    with pytest.raises(ValueError, match="r=4"):
        lora.lora_context(shapes, lora.LoraConfig(r=4, lora_alpha=2))


def test_lora_gradient_matches_finite_differences(params, images):
    cfg = lora.LoraConfig(r=4, lora_alpha=2, target_modules=("value", "fc1"))
    factors = _perturb(lora.init_lora(CFG, cfg, jax.random.key(8)), 9, scale=0.3)
    with jax.enable_x64(True):
        params64, images64, factors64 = jax.tree_util.tree_map(
            lambda a: jnp.asarray(a, jnp.float64), (params, images[:1], factors))

        @jax.jit
        def loss(a_value, b_fc1):
            tree = {0: {"value": {"A": a_value, "B": factors64["0"]["value"]["B"]},
                        "fc1": {"A": factors64["0"]["fc1"]["A"], "B": b_fc1}}}
            feats = vit.apply(CFG, params64, images64, lora.lora_context(tree, cfg), output="cls")
            return jnp.sum(jnp.sin(feats))

        check_grads(loss, (factors64["0"]["value"]["A"], factors64["0"]["fc1"]["B"]), order=1,
                    modes=("rev",), eps=1e-5, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("mode, attn", [("sequential", True), ("parallel", False)])
def test_adapters_identity_at_init_then_match_numpy(params, images, mode, attn):
    cfg = adapters.AdapterConfig(bottleneck_dim=4, mode=mode, scale=0.5, attn=attn)
    init = adapters.init_adapters(CFG, cfg, jax.random.key(10))
    assert set(init["0"]) == ({"mlp", "attn"} if attn else {"mlp"})
    assert not np.asarray(init["0"]["mlp"]["up"]["kernel"]).any()
    np.testing.assert_array_equal(_forward(params, images, adapters.adapter_context(init, cfg)),
                                  _forward(params, images))
    trained = _perturb(init, 11, scale=0.3)
    got = _forward(params, images, adapters.adapter_context(trained, cfg))
    want = np_final(params, np_block(np_embed(params, images), _block(params, 0),
                                     adapter=trained["0"]["mlp"], adapter_attn=trained["0"].get("attn"),
                                     adapter_mode=mode, adapter_scale=0.5))
    np.testing.assert_allclose(got, want, atol=5e-5)


# ----------------------------------------------------------------------------- SSF
def test_ssf_identity_init_is_exact_and_paper_init_matches_numpy(params, images):
    identity = ssf.init_ssf(CFG, ssf.SSFConfig(), jax.random.key(0))
    assert tuple(identity["0"]) == SSF_POINTS and identity["0"]["fc1"]["scale"].shape == (24,)
    np.testing.assert_array_equal(_forward(params, images, ssf.ssf_context(identity)),
                                  _forward(params, images))
    paper_cfg = ssf.SSFConfig(points=("ln1", "query", "key", "value", "out", "ln2", "fc2"),
                              init="paper")
    paper = ssf.init_ssf(CFG, paper_cfg, jax.random.key(12))
    scales = np.concatenate([np.asarray(p["scale"]) for p in paper["0"].values()])
    shifts = np.concatenate([np.asarray(p["shift"]) for p in paper["0"].values()])
    assert abs(scales.mean() - 1) < 0.01 and 0.015 < scales.std() < 0.025  # N(1, 0.02^2)
    assert abs(shifts.mean()) < 0.01 and 0.015 < shifts.std() < 0.025  # N(0, 0.02^2)
    trained = _perturb(paper, 13, scale=0.2)
    got = _forward(params, images, ssf.ssf_context(trained))
    want = np_final(params, np_block(np_embed(params, images), _block(params, 0),
                                     ssf_params=trained["0"]))
    np.testing.assert_allclose(got, want, atol=5e-5)
    with pytest.raises(ValueError, match="subset of"):
        ssf.SSFConfig(points=("qkv",))


def test_ssf_on_the_patch_embedding_and_the_final_norm(params, images):
    """The official SSF's two points outside the blocks: the patch tokens (before [CLS] and
    the position embedding) and the final LayerNorm's output."""
    cfg = ssf.SSFConfig(points=("fc2",), init="paper", model_points=("final", "embed"))
    assert cfg.model_points == ("embed", "final")
    trained = _perturb(ssf.init_ssf(CFG, cfg, jax.random.key(5)), 6, scale=0.2)
    assert set(trained) == {"0", "embed", "final"} and trained["embed"]["scale"].shape == (16,)
    got = _forward(params, images, ssf.ssf_context(trained))
    want = np_final(params, np_block(np_embed(params, images, trained["embed"]),
                                     _block(params, 0), ssf_params=trained["0"]),
                    trained["final"])
    np.testing.assert_allclose(got, want, atol=5e-5)
    identity = ssf.init_ssf(CFG, ssf.SSFConfig(model_points=("embed", "final")),
                            jax.random.key(0))
    np.testing.assert_array_equal(_forward(params, images, ssf.ssf_context(identity)),
                                  _forward(params, images))
    with pytest.raises(ValueError, match="model_points must be a subset"):
        ssf.SSFConfig(model_points=("head",))
    with pytest.raises(ValueError, match="unknown model-level SSF point"):
        PEFTContext(ssf={"head": trained["final"]})


# ----------------------------------------------------------------------------- LAE's modules
def test_lae_attention_adapter_and_compensated_prefix_match_numpy(params, images):
    """LAE's adapter (beside the attention, from LN1's output, exact GELU) and its
    compensated prefix (prefix attention columns divided by their sum)."""
    cfg = adapters.AdapterConfig(bottleneck_dim=3, mlp=False, attn=True, attn_mode="parallel",
                                 activation="gelu", scale=0.7)
    trained = _perturb(adapters.init_adapters(CFG, cfg, jax.random.key(4)), 5, scale=0.3)
    assert set(trained["0"]) == {"attn"}
    got = _forward(params, images, adapters.adapter_context(trained, cfg))
    want = np_final(params, np_block(np_embed(params, images), _block(params, 0),
                                     adapter_attn=trained["0"]["attn"], adapter_scale=0.7,
                                     adapter_attn_parallel=True, activation="gelu"))
    np.testing.assert_allclose(got, want, atol=5e-5)
    pcfg = prompts.PrefixConfig(length=3, init="small_uniform", compensated=True)
    prefix = prompts.init_prefixes(CFG, pcfg, jax.random.key(6))
    assert 0 <= float(np.min(prefix["0"])) and float(np.max(prefix["0"])) < 0.01
    prefix = _perturb(prefix, 7, scale=0.5)
    got = _forward(params, images, prompts.prefix_context(prefix, pcfg))
    batched = np.broadcast_to(np.asarray(prefix["0"]), (BATCH,) + prefix["0"].shape)
    want = np_final(params, np_block(np_embed(params, images), _block(params, 0),
                                     prefix=batched, compensated=True))
    np.testing.assert_allclose(got, want, atol=5e-5)


# ----------------------------------------------------------------------------- prompts / prefixes
def test_prefix_shifts_attention_as_numpy_says(params, images):
    cfg = prompts.PrefixConfig(length=2)
    shared = prompts.init_prefixes(CFG, cfg, jax.random.key(13))
    assert shared["0"].shape == (2, 2, 16)
    assert np.abs(shared["0"]).max() <= 1 and np.abs(shared["0"]).max() > 0.5  # DualPrompt's U(-1, 1)
    ctx = prompts.prefix_context(shared, cfg).layers[0]  # key half, value half
    np.testing.assert_array_equal(ctx.prefix_key, shared["0"][0])
    np.testing.assert_array_equal(ctx.prefix_value, shared["0"][1])
    # per-example prefixes: each example attends to its own extra keys/values
    per_example = np.stack([np.asarray(shared["0"]), -np.asarray(shared["0"])[:, ::-1]])
    got = _forward(params, images, prompts.prefix_context({0: per_example}))
    x = np_embed(params, images)
    want = np_final(params, np_block(x, _block(params, 0), prefix=per_example.astype(np.float64)))
    np.testing.assert_allclose(got, want, atol=5e-5)
    assert np.abs(got - np_final(params, np_block(x, _block(params, 0)))).max() > 1e-2
    with pytest.raises(ValueError, match=r"\(2, Lp, D\)"):
        prompts.prefix_context({0: np.zeros((3, 3, 16))})


def test_shallow_prompt_per_example_matches_numpy(params, images):
    cfg = prompts.PromptConfig(length=2)
    init = prompts.init_prompts(CFG, cfg, jax.random.key(15))
    bound = math.sqrt(6 / (1 * 7 * 7 + 16))  # VPT's init for a 1-channel, patch-7 ViT
    assert list(init) == ["0"] and init["0"].shape == (2, 16) and np.abs(init["0"]).max() <= bound
    per_example = np.random.default_rng(16).normal(size=(BATCH, 2, 16)).astype(np.float32)
    got = _forward(params, images, prompts.prompt_context({0: per_example}, cfg))
    x = with_prompt(np_embed(params, images), per_example)
    np.testing.assert_allclose(got, np_final(params, np_block(x, _block(params, 0))), atol=5e-5)
    with pytest.raises(ValueError, match="deep=True"):
        prompts.PromptConfig(length=2, layers=[1])


def test_deep_prompts_replace_or_append(params2, images):
    cfg = prompts.PromptConfig(length=2, deep=True, mode="replace", init="uniform")
    deep = prompts.init_prompts(CFG2, cfg, jax.random.key(17))
    assert sorted(deep) == ["0", "1"]
    got = _forward(params2, images, prompts.prompt_context(deep, cfg), cfg=CFG2)
    p0, p1 = (np.broadcast_to(np.asarray(deep[str(i)]), (BATCH, 2, 16)) for i in (0, 1))
    x = np_block(with_prompt(np_embed(params2, images), p0), _block(params2, 0))
    x = np_block(with_prompt(x, p1, keep_from=3), _block(params2, 1))  # VPT-deep: replace
    np.testing.assert_allclose(got, np_final(params2, x), atol=5e-5)
    # append keeps layer 0's prompt outputs: 1 + 2 + 2 + 16 tokens instead of 1 + 2 + 16
    append_cfg = prompts.PromptConfig(length=2, deep=True, mode="append")
    appended = jax.eval_shape(lambda p, c: vit.apply(CFG2, p, images, c, output="tokens"),
                              params2, prompts.prompt_context(deep, append_cfg))
    assert got.shape == (BATCH, 19, 16) and appended.shape == (BATCH, 21, 16)


def test_contexts_combine_and_keep_their_options():
    lora_cfg = lora.LoraConfig(r=2, lora_alpha=6)
    lora_params = jax.eval_shape(lambda k: lora.init_lora(CFG, lora_cfg, k), jax.random.key(0))
    prompt_cfg = prompts.PromptConfig(length=2, deep=True, mode="append")
    both = prompts.prompt_context({0: np.zeros((2, 16))}, prompt_cfg).merge(
        lora.lora_context(lora_params, lora_cfg))
    assert isinstance(both, PEFTContext)
    assert both.layers[0].lora_scaling == 3.0 and both.layers[0].prompt_mode == "append"


# ----------------------------------------------------------------------------- prompt pool
def _np_cos(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def test_pool_init_options():
    # shapes equal to the prefix/prompt tests' so the compiled samplers are reused
    pool = prompt_pool.init_pool(2, 2, 16, jax.random.key(0))
    assert pool["prompts"].shape == (2, 2, 16) and pool["keys"].shape == (2, 16)
    values = np.concatenate([np.ravel(pool["prompts"]), np.ravel(pool["keys"])])
    assert np.abs(values).max() <= 1 and 0.45 < values.std() < 0.7  # U(-1, 1): std 0.577
    small = prompt_pool.init_pool(2, 2, 16, jax.random.key(1), key_init="small_uniform",
                                  prompt_init="zeros")
    assert 0 <= small["keys"].min() and small["keys"].max() < 0.01 and not small["prompts"].any()
    ortho = prompt_pool.init_pool(2, 1, 16, jax.random.key(2), key_init="orthogonal",
                                  prompt_init="orthogonal")
    flat = np.asarray(ortho["prompts"]).reshape(2, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(ortho["keys"] @ ortho["keys"].T, np.eye(2), atol=1e-5)
    prefix_pool = jax.eval_shape(lambda k: prompt_pool.init_pool(10, 5, 768, k, prefix=True),
                                 jax.random.key(0))
    assert prefix_pool["prompts"].shape == (10, 2, 5, 768)
    with pytest.raises(ValueError, match="pool init must be one of"):
        prompt_pool.init_pool(4, 2, 8, jax.random.key(0), key_init="xavier")


def test_cosine_topk_and_batchwise_selection_match_numpy():
    rng = np.random.default_rng(0)
    query, keys = rng.normal(size=(6, 8)), rng.normal(size=(5, 8))
    sim = prompt_pool.cosine_similarity(query.astype(np.float32), keys.astype(np.float32))
    np.testing.assert_allclose(sim, _np_cos(query, keys), atol=1e-6)
    idx = np.asarray(prompt_pool.select_topk(sim, 2))
    np.testing.assert_array_equal(idx, np.argsort(-_np_cos(query, keys), axis=1)[:, :2])
    counts = np.bincount(idx.ravel(), minlength=5)
    np.testing.assert_array_equal(prompt_pool.selection_counts(idx, 5), counts)
    batchwise = np.asarray(prompt_pool.select_topk(sim, 2, batchwise_prompt=True))
    majority = sorted(range(5), key=lambda i: (-counts[i], i))[:2]  # most chosen, lower id on ties
    np.testing.assert_array_equal(batchwise, np.tile(majority, (6, 1)))
    # the official code votes within each device's batch: groups of 4 here (the last of 2)
    grouped = np.asarray(prompt_pool.select_topk(sim, 2, batchwise_prompt=True, group_size=4))
    for rows in (slice(0, 4), slice(4, 6)):
        part = np.bincount(idx[rows].ravel(), minlength=5)
        top = sorted(range(5), key=lambda i: (-part[i], i))[:2]
        np.testing.assert_array_equal(grouped[rows], np.tile(top, (len(grouped[rows]), 1)))
    from pecft_jax.methods.dualprompt import DualPrompt
    from pecft_jax.methods.l2p import L2P
    for config in (L2P.Config, DualPrompt.Config):
        with pytest.raises(ValueError, match="batchwise_group must be >= 0"):
            config(batchwise_group=-1)
    # a zero vector stays finite (L2P's clamped normalisation)
    zero = prompt_pool.cosine_similarity(np.zeros((1, 8), np.float32), keys.astype(np.float32))
    assert np.all(np.asarray(zero) == 0)
    with pytest.raises(ValueError, match="top_k"):
        prompt_pool.select_topk(sim, 6)


def test_frequency_penalty_follows_l2p_formula():
    rng = np.random.default_rng(1)
    cos = np.clip(rng.normal(0.3, 0.3, size=(4, 6)), -1, 1).astype(np.float32)
    counts = np.array([30.0, 10.0, 0.0, 5.0, 50.0, 5.0])
    idx = np.asarray(prompt_pool.select_topk(cos, 3, frequency_penalty=counts))
    distance = (1 - cos.astype(np.float64)) * counts / counts.sum()
    np.testing.assert_array_equal(idx, np.argsort(distance, axis=1, kind="stable")[:, :3])
    assert np.all(idx[:, 0] == 2)  # the never used prompt comes first
    # no history yet: plain similarity ranking
    plain = prompt_pool.select_topk(cos, 3, frequency_penalty=np.zeros(6))
    np.testing.assert_array_equal(plain, np.argsort(-cos, axis=1)[:, :3])


def test_gather_prompts_and_key_matching_loss():
    rng = np.random.default_rng(2)
    pool = rng.normal(size=(5, 3, 4)).astype(np.float32)
    idx = np.array([[4, 1], [0, 0]])
    got = np.asarray(prompt_pool.gather_prompts(pool, idx))
    np.testing.assert_array_equal(got[0], np.concatenate([pool[4], pool[1]]))
    np.testing.assert_array_equal(got[1], np.concatenate([pool[0], pool[0]]))
    prefix_pool = rng.normal(size=(5, 2, 3, 4)).astype(np.float32)
    got = np.asarray(prompt_pool.gather_prompts(prefix_pool, idx))
    assert got.shape == (2, 2, 6, 4)
    np.testing.assert_array_equal(got[0, 1], np.concatenate([prefix_pool[4, 1], prefix_pool[1, 1]]))

    query, keys = rng.normal(size=(2, 4)), rng.normal(size=(5, 4))
    cos = _np_cos(query, keys)
    want = np.mean([(1 - cos[b, idx[b]]).sum() for b in range(2)])
    loss_and_grad = jax.value_and_grad(
        lambda k: prompt_pool.key_matching_loss(query.astype(np.float32), k, idx))
    loss, grads = loss_and_grad(keys.astype(np.float32))
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    grads = np.asarray(grads)  # only the selected keys (4, 1, 0) are pulled
    assert np.all(grads[[2, 3]] == 0) and np.all(np.abs(grads[[0, 1, 4]]).sum(1) > 0)
