"""The ViT backbone: Google's parameter tree, hook points, sharding."""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pecft_jax.backbones import vit
from pecft_jax.backbones.context import LayerPEFT, PEFTContext
from pecft_jax.train import mesh as mesh_lib

TINY = vit.ViTConfig(name="tiny", image_size=16, patch_size=4, hidden_size=32, num_layers=3,
                     num_heads=4, mlp_dim=64, num_channels=3, num_classes=5)


@pytest.fixture(scope="module")
def tiny():
    params = vit.init_params(TINY, jax.random.key(0))
    # A zero-initialised head would make every logit test vacuous.
    params["head"]["kernel"] = jax.random.normal(jax.random.key(1), params["head"]["kernel"].shape)
    images = jax.random.normal(jax.random.key(2), (8, 16, 16, 3))
    return params, images


def test_parameter_tree_matches_google_names_and_vit_b16_size():
    cfg = vit.get_config("ViT-B/16", num_classes=1000)
    shapes = jax.eval_shape(lambda: vit.init_params(cfg, jax.random.key(0)))
    block = shapes["Transformer"]["encoderblock_11"]
    assert set(block) == {"LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                          "MlpBlock_3"}
    attn = block["MultiHeadDotProductAttention_1"]
    assert attn["query"]["kernel"].shape == (768, 12, 64)
    assert attn["out"]["kernel"].shape == (12, 64, 768)
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
    assert shapes["embedding"]["kernel"].shape == (16, 16, 3, 768)
    # ViT-B/16 with a 1000-class head has 86,567,656 parameters.
    assert vit.param_count(shapes) == 86_567_656


def _numpy_vit_tokens(params, images, cfg, prompt=None, block_inputs=None):
    """An independent numpy forward of the plain ViT (tanh-GELU), optional input prompts;
    ``block_inputs`` (a list) collects each block's (attention input, MLP input)."""
    p = jax.tree_util.tree_map(np.asarray, params)
    x = np.asarray(images, np.float64)
    b, ps = x.shape[0], cfg.patch_size
    g = cfg.image_size // ps
    patches = x.reshape(b, g, ps, g, ps, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
    kernel = p["embedding"]["kernel"].reshape(-1, cfg.hidden_size)
    tok = patches @ kernel + p["embedding"]["bias"]
    tok = np.concatenate([np.broadcast_to(p["cls"], (b, 1, cfg.hidden_size)), tok], 1)
    tok = tok + p["Transformer"]["posembed_input"]["pos_embedding"]
    if prompt is not None:
        tok = np.concatenate([tok[:, :1], np.broadcast_to(prompt, (b,) + prompt.shape), tok[:, 1:]], 1)

    def ln(v, q):
        mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

    for i in range(cfg.num_layers):
        blk = p["Transformer"][f"encoderblock_{i}"]
        a = blk["MultiHeadDotProductAttention_1"]
        h = ln(tok, blk["LayerNorm_0"])
        attn_input = h
        q, k, v = (np.einsum("bnd,dhk->bhnk", h, a[n]["kernel"]) + a[n]["bias"][None, :, None]
                   for n in ("query", "key", "value"))
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(cfg.head_dim)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        o = np.einsum("bhnk,hkd->bnd", w @ v, a["out"]["kernel"]) + a["out"]["bias"]
        tok = tok + o
        m = blk["MlpBlock_3"]
        if block_inputs is not None:
            block_inputs.append((attn_input, ln(tok, blk["LayerNorm_2"])))
        h = gelu(ln(tok, blk["LayerNorm_2"]) @ m["Dense_0"]["kernel"] + m["Dense_0"]["bias"])
        tok = tok + h @ m["Dense_1"]["kernel"] + m["Dense_1"]["bias"]
    return ln(tok, p["Transformer"]["encoder_norm"])


def test_features_return_every_blocks_layer_inputs(tiny):
    """What InfLoRA/GPM build subspaces from: the input of each block's attention
    projections and of its MLP, as an independent numpy forward computes them."""
    params, images = tiny
    want = []
    _numpy_vit_tokens(params, images, TINY, block_inputs=want)
    feats = jax.jit(lambda p, x: vit.apply(TINY, p, x, output="features"))(params, images)
    assert len(feats["blocks"]) == TINY.num_layers
    for got, (attn_in, mlp_in) in zip(feats["blocks"], want):
        np.testing.assert_allclose(got["attn_input"], attn_in, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["mlp_input"], mlp_in, rtol=1e-4, atol=1e-4)
    # stop_at_layer=k runs (and reports) the first k blocks only
    two = vit.apply(TINY, params, images, output="features", stop_at_layer=2)
    assert len(two["blocks"]) == 2
    np.testing.assert_allclose(two["blocks"][1]["mlp_input"], want[1][1], rtol=1e-4, atol=1e-4)


def test_forward_matches_numpy_reference(tiny):
    params, images = tiny
    tokens = vit.apply(TINY, params, images, output="tokens")
    np.testing.assert_allclose(tokens, _numpy_vit_tokens(params, images, TINY), atol=1e-4)
    logits = vit.apply(TINY, params, images)
    expected = np.asarray(tokens[:, 0]) @ np.asarray(params["head"]["kernel"]) + np.asarray(
        params["head"]["bias"])
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_input_prompts_match_numpy_reference(tiny):
    params, images = tiny
    prompt = np.asarray(jax.random.normal(jax.random.key(3), (5, 32)))
    feats = vit.apply(TINY, params, images, PEFTContext({0: LayerPEFT(prompt=prompt)}),
                      output="features")
    assert feats["num_prompts"] == 5 and feats["tokens"].shape == (8, 1 + 5 + 16, 32)
    np.testing.assert_allclose(feats["tokens"],
                               _numpy_vit_tokens(params, images, TINY, prompt), atol=1e-4)


def test_empty_context_is_exactly_the_plain_vit(tiny):
    params, images = tiny
    plain = vit.apply(TINY, params, images)
    assert np.array_equal(plain, vit.apply(TINY, params, images, PEFTContext()))
    assert np.array_equal(plain, vit.apply(TINY, params, images, PEFTContext({1: LayerPEFT()})))


def test_deep_prompts_append_and_replace(tiny):
    params, images = tiny
    p0 = jnp.ones((2, 32))
    p2 = jnp.zeros((3, 32))
    appended = vit.apply(TINY, params, images, PEFTContext(
        {0: LayerPEFT(prompt=p0), 2: LayerPEFT(prompt=p2, prompt_mode="append")}),
        output="features")
    assert appended["num_prompts"] == 5 and appended["tokens"].shape[1] == 1 + 5 + 16
    replaced = vit.apply(TINY, params, images, PEFTContext(
        {0: LayerPEFT(prompt=p0), 2: LayerPEFT(prompt=p2, prompt_mode="replace")}),
        output="features")
    assert replaced["num_prompts"] == 3 and replaced["tokens"].shape[1] == 1 + 3 + 16


def test_stop_at_layer_returns_intermediate_tokens(tiny):
    params, images = tiny
    inter = vit.apply(TINY, params, images, output="tokens", stop_at_layer=2)
    assert inter.shape == (8, 17, 32)
    zero = vit.apply(TINY, params, images, output="tokens", stop_at_layer=0)
    # with no block run, the [CLS] token is its parameter plus its position embedding
    pos = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    np.testing.assert_allclose(np.asarray(zero[:, 0]), np.broadcast_to(
        np.asarray(params["cls"])[0, 0] + pos[0, 0], (8, 32)), atol=1e-6)


def test_bad_inputs_raise_clear_errors(tiny):
    params, images = tiny
    with pytest.raises(ValueError, match="expects images of shape"):
        vit.apply(TINY, params, images[:, :8])
    with pytest.raises(ValueError, match="names layers"):
        vit.apply(TINY, params, images, PEFTContext({7: LayerPEFT(prompt=jnp.ones((1, 32)))}))
    with pytest.raises(ValueError, match="unknown ViT config"):
        vit.get_config("ViT-Z/3")
    with pytest.raises(ValueError, match="prompt_mode"):
        LayerPEFT(prompt_mode="sideways")


def test_sharded_forward_equals_single_device(tiny):
    assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
    params, images = tiny
    single = jax.jit(lambda p, x: vit.apply(TINY, p, x))(params, images)
    mesh = mesh_lib.make_mesh()
    sharded_images = jax.device_put(images, NamedSharding(mesh, PartitionSpec("data")))
    replicated = mesh_lib.replicate(params, mesh)
    out = jax.jit(lambda p, x: vit.apply(TINY, p, x))(replicated, sharded_images)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5)


def _prefixed(batch):
    """A context with prefix keys/values at block 1 (the DualPrompt / CODA hook)."""
    pk = jax.random.normal(jax.random.key(4), (batch, 3, 32))
    pv = jax.random.normal(jax.random.key(5), (batch, 3, 32))
    return PEFTContext({1: LayerPEFT(prefix_key=pk, prefix_value=pv)})


def test_dot_product_attention_matches_the_einsum_attention(tiny):
    params, images = tiny
    fused = TINY.replace(attention="xla")  # jax.nn.dot_product_attention ('cudnn' needs a GPU)
    for ctx in (None, _prefixed(images.shape[0])):
        np.testing.assert_allclose(vit.apply(fused, params, images, ctx, output="tokens"),
                                   vit.apply(TINY, params, images, ctx, output="tokens"),
                                   atol=2e-5)
    np.testing.assert_allclose(vit.apply(fused, params, images, output="tokens"),
                               _numpy_vit_tokens(params, images, TINY), atol=1e-4)


def test_cudnn_attention_is_refused_without_bf16_or_off_a_gpu(tmp_path, monkeypatch, caplog):
    """cuDNN's fused attention takes bf16 inputs on NVIDIA GPUs: a float32 config (ViT's,
    BERT's) and a training run whose devices are not GPUs fail before anything loads,
    naming the fix (JAX itself would raise at the first trace, after the backbone has
    loaded); evaluating or planning such a run elsewhere uses XLA's attention instead."""
    from pecft_jax.backbones import bert
    from pecft_jax.backbones.backbone import attention_for_devices
    from pecft_jax.configs import load_config_file
    from pecft_jax.train import loop
    for make in (lambda **k: TINY.replace(**k),
                 lambda **k: bert.get_config("BERT-Tiny", **k)):
        with pytest.raises(ValueError, match="takes bf16 inputs only, and dtype is 'float32'"):
            make(attention="cudnn")
        assert make(attention="cudnn", dtype="bfloat16").attention == "cudnn"
    gpu, cpu = (types.SimpleNamespace(platform=p) for p in ("gpu", "cpu"))
    assert attention_for_devices("cudnn", [gpu, gpu], fall_back=False) == "cudnn"
    assert attention_for_devices("einsum", [cpu], fall_back=False) == "einsum"
    assert attention_for_devices("cudnn", [cpu], fall_back=True) == "xla"
    with pytest.raises(ValueError, match="this run's devices are cpu/gpu"):
        attention_for_devices("cudnn", [gpu, cpu], fall_back=False)

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config_file(os.path.join(root, "experiments", "configs", "l2p.py"))
    config.compilation_cache_dir = ""  # no persistent cache for the rest of the session
    loaded = []
    original = loop.backbone_from_config
    monkeypatch.setattr(loop, "backbone_from_config",
                        lambda bcfg, seed: loaded.append(bcfg.attention) or original(bcfg, seed))
    config.backbone.update(attention="cudnn")  # float32: refused before the devices are asked
    with pytest.raises(ValueError, match="takes bf16 inputs only"):
        loop.ContinualTrainer(config, str(tmp_path / "a"))
    config.backbone.update(dtype="bfloat16")
    with pytest.raises(ValueError, match=r"set --config.backbone.attention=xla"):
        loop.ContinualTrainer(config, str(tmp_path / "b"))
    assert not loaded
    with caplog.at_level("WARNING", logger="pecft_jax"):
        trainer = loop.ContinualTrainer(config, str(tmp_path / "c"), write_metrics=False,
                                        attention_fallback=True)
    trainer.close()
    assert loaded == ["xla"] and trainer.backbone.config.attention == "xla"
    assert config.backbone.attention == "cudnn"  # the run's own config is left as it was
    assert "using 'xla' (the same function)" in caplog.text
    assert loop.plan_run(config)["method"] == "l2p"  # a dry run plans it here too


def test_bfloat16_compute_keeps_float32_parameters_outputs_and_gradients(tiny):
    params, images = tiny
    half = TINY.replace(dtype="bfloat16")
    assert vit.init_params(half, jax.random.key(0))["cls"].dtype == jnp.float32
    exact = vit.apply(TINY, params, images, output="cls")
    approx = vit.apply(half, params, images, output="cls")
    assert approx.dtype == jnp.float32
    # bf16 keeps 8 mantissa bits: ~1% relative error through three blocks, not more
    err = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert 1e-5 < err < 5e-2, err  # > 1e-5: the forward really ran in bf16
    prompt = jax.random.normal(jax.random.key(3), (5, 32))

    w = jax.random.normal(jax.random.key(6), (32,))  # a plain sum of LayerNorm outputs is 0

    def loss(p, cfg):
        return (vit.apply(cfg, params, images, PEFTContext({0: LayerPEFT(prompt=p)}),
                          output="cls") @ w).sum()
    g_half, g_exact = jax.grad(loss)(prompt, half), jax.grad(loss)(prompt, TINY)
    assert g_half.dtype == jnp.float32 and np.all(np.isfinite(g_half))
    cos = np.sum(g_half * g_exact) / (np.linalg.norm(g_half) * np.linalg.norm(g_exact))
    assert cos > 0.99, cos


def test_unknown_dtype_or_attention_is_refused():
    with pytest.raises(ValueError, match="dtype"):
        TINY.replace(dtype="float16")
    with pytest.raises(ValueError, match="attention"):
        TINY.replace(attention="flash")


def test_backbone_gelu_form_can_be_chosen():
    """PyTorch official code runs Google's .npz weights through timm's exact GELU;
    ``backbone.gelu_approximate=False`` reproduces that (None keeps the format's own)."""
    from pecft_jax.backbones.backbone import load_backbone
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype(np.float32)
    exact, params = load_backbone("random:ViT-Micro/4", gelu_approximate=False)
    tanh, _ = load_backbone("random:ViT-Micro/4")
    assert not exact.config.gelu_approximate and tanh.config.gelu_approximate
    a, b = exact.apply(params, images, output="cls"), tanh.apply(params, images, output="cls")
    assert 0 < float(np.abs(np.asarray(a) - np.asarray(b)).max()) < 1e-2


def test_exact_gelu_is_pytorchs_formula_with_its_gradient():
    """``context.gelu(x, approximate=False)`` is ``x/2 (1 + erf(x / sqrt 2))`` (float64
    reference from ``math.erf``), its derivative ``Phi(x) + x phi(x)``; and its tanh form is
    ``jax.nn.gelu``'s."""
    import math
    from pecft_jax.backbones.context import gelu
    x = np.linspace(-10, 10, 2001).astype(np.float32)
    ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x), False)), ref, atol=1e-6,
                               rtol=1e-6)
    grad = jax.vmap(jax.grad(lambda v: gelu(v, False)))(jnp.asarray(x))
    phi = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)
    ref_grad = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    np.testing.assert_allclose(np.asarray(grad), ref_grad + x * phi, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(gelu(jnp.asarray(x), True)),
                                  np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True)))
    # bf16: computed in float32 and rounded once -- the float32 result, rounded
    narrow = gelu(jnp.asarray(x, jnp.bfloat16), False)
    assert narrow.dtype == jnp.bfloat16
    exact_of_narrow = gelu(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), False)
    np.testing.assert_array_equal(np.asarray(narrow),
                                  np.asarray(exact_of_narrow.astype(jnp.bfloat16)))
    assert float(narrow[np.argmin(np.abs(x + 3))]) < -0.003  # GELU(-3) = -0.00405, not 0
