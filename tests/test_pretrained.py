"""Pretrained-checkpoint loaders: every layout against an independent numpy ViT.

Random weights are generated once in timm's layout; the test itself rewrites them into the
Hugging Face and Google layouts, so the library's converters are checked against this file's
own understanding of each layout, and the forward against a numpy ViT that reads timm tensors
directly.
"""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from pecft_jax.backbones import vit
from pecft_jax.backbones.pretrained import (CheckpointError, detect_format, fingerprint,
                                            load_params, load_pretrained, resize_pos_embedding,
                                            save_params)

HIDDEN, LAYERS, HEADS, PATCH, IMAGE, CHANNELS, CLASSES, MLP = 32, 2, 2, 4, 16, 3, 5, 64
GRID = IMAGE // PATCH
HEAD_DIM = HIDDEN // HEADS


# ------------------------------------------------------------------------------------------
# Random weights in timm's layout, and the test's own rewrites into HF and Google layouts.
# ------------------------------------------------------------------------------------------

def random_timm_tensors(seed=0, classes=CLASSES, pre_logits=None):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    t = {"cls_token": normal(1, 1, HIDDEN),
         "pos_embed": normal(1, GRID * GRID + 1, HIDDEN, scale=.5),
         "patch_embed.proj.weight": normal(HIDDEN, CHANNELS, PATCH, PATCH,
                                           scale=1 / math.sqrt(CHANNELS * PATCH * PATCH)),
         "patch_embed.proj.bias": normal(HIDDEN, scale=.1)}
    for layer in range(LAYERS):
        b = f"blocks.{layer}"
        for norm in ("norm1", "norm2"):
            t[f"{b}.{norm}.weight"] = 1 + normal(HIDDEN, scale=.1)
            t[f"{b}.{norm}.bias"] = normal(HIDDEN, scale=.1)
        t[f"{b}.attn.qkv.weight"] = normal(3 * HIDDEN, HIDDEN, scale=1 / math.sqrt(HIDDEN))
        t[f"{b}.attn.qkv.bias"] = normal(3 * HIDDEN, scale=.1)
        t[f"{b}.attn.proj.weight"] = normal(HIDDEN, HIDDEN, scale=1 / math.sqrt(HIDDEN))
        t[f"{b}.attn.proj.bias"] = normal(HIDDEN, scale=.1)
        t[f"{b}.mlp.fc1.weight"] = normal(MLP, HIDDEN, scale=1 / math.sqrt(HIDDEN))
        t[f"{b}.mlp.fc1.bias"] = normal(MLP, scale=.1)
        t[f"{b}.mlp.fc2.weight"] = normal(HIDDEN, MLP, scale=1 / math.sqrt(MLP))
        t[f"{b}.mlp.fc2.bias"] = normal(HIDDEN, scale=.1)
    t["norm.weight"] = 1 + normal(HIDDEN, scale=.1)
    t["norm.bias"] = normal(HIDDEN, scale=.1)
    feature = HIDDEN
    if pre_logits:
        t["pre_logits.fc.weight"] = normal(pre_logits, HIDDEN, scale=1 / math.sqrt(HIDDEN))
        t["pre_logits.fc.bias"] = normal(pre_logits, scale=.1)
        feature = pre_logits
    if classes:
        t["head.weight"] = normal(classes, feature, scale=1 / math.sqrt(feature))
        t["head.bias"] = normal(classes, scale=.1)
    return t


def split_qkv(t, layer):
    w, b = t[f"blocks.{layer}.attn.qkv.weight"], t[f"blocks.{layer}.attn.qkv.bias"]
    return {name: (w[i * HIDDEN:(i + 1) * HIDDEN], b[i * HIDDEN:(i + 1) * HIDDEN])
            for i, name in enumerate(("query", "key", "value"))}


def timm_to_hf(t, prefix="vit."):
    """ViTForImageClassification layout (prefix 'vit.'), or ViTModel (prefix '') where a
    timm ``pre_logits.fc`` becomes the pooler."""
    hf = {f"{prefix}embeddings.cls_token": t["cls_token"],
          f"{prefix}embeddings.position_embeddings": t["pos_embed"],
          f"{prefix}embeddings.patch_embeddings.projection.weight": t["patch_embed.proj.weight"],
          f"{prefix}embeddings.patch_embeddings.projection.bias": t["patch_embed.proj.bias"],
          f"{prefix}layernorm.weight": t["norm.weight"], f"{prefix}layernorm.bias": t["norm.bias"]}
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after",
               "attn.proj": "attention.output.dense", "mlp.fc1": "intermediate.dense",
               "mlp.fc2": "output.dense"}
    for layer in range(LAYERS):
        dst = f"{prefix}encoder.layer.{layer}"
        for name, (w, b) in split_qkv(t, layer).items():
            hf[f"{dst}.attention.attention.{name}.weight"] = w
            hf[f"{dst}.attention.attention.{name}.bias"] = b
        for old, new in renames.items():
            for part in ("weight", "bias"):
                hf[f"{dst}.{new}.{part}"] = t[f"blocks.{layer}.{old}.{part}"]
    if "head.weight" in t:
        hf["classifier.weight"], hf["classifier.bias"] = t["head.weight"], t["head.bias"]
    if "pre_logits.fc.weight" in t:
        hf["pooler.dense.weight"] = t["pre_logits.fc.weight"]
        hf["pooler.dense.bias"] = t["pre_logits.fc.bias"]
    return hf


def hf_config(**changes):
    conf = {"model_type": "vit", "architectures": ["ViTForImageClassification"],
            "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": MLP, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "image_size": IMAGE, "patch_size": PATCH, "num_channels": CHANNELS, "qkv_bias": True}
    conf.update(changes)
    return {k: v for k, v in conf.items() if v is not None}


def timm_to_google(t):
    g = {"embedding/kernel": t["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": t["patch_embed.proj.bias"], "cls": t["cls_token"],
         "Transformer/posembed_input/pos_embedding": t["pos_embed"],
         "Transformer/encoder_norm/scale": t["norm.weight"],
         "Transformer/encoder_norm/bias": t["norm.bias"]}
    for layer in range(LAYERS):
        src, dst = f"blocks.{layer}", f"Transformer/encoderblock_{layer}"
        for norm, ours in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            g[f"{dst}/{ours}/scale"] = t[f"{src}.{norm}.weight"]
            g[f"{dst}/{ours}/bias"] = t[f"{src}.{norm}.bias"]
        att = f"{dst}/MultiHeadDotProductAttention_1"
        for name, (w, b) in split_qkv(t, layer).items():
            g[f"{att}/{name}/kernel"] = w.T.reshape(HIDDEN, HEADS, HEAD_DIM)
            g[f"{att}/{name}/bias"] = b.reshape(HEADS, HEAD_DIM)
        g[f"{att}/out/kernel"] = t[f"{src}.attn.proj.weight"].T.reshape(HEADS, HEAD_DIM, HIDDEN)
        g[f"{att}/out/bias"] = t[f"{src}.attn.proj.bias"]
        for fc, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            g[f"{dst}/MlpBlock_3/{dense}/kernel"] = t[f"{src}.mlp.{fc}.weight"].T
            g[f"{dst}/MlpBlock_3/{dense}/bias"] = t[f"{src}.mlp.{fc}.bias"]
    if "pre_logits.fc.weight" in t:
        g["pre_logits/kernel"] = t["pre_logits.fc.weight"].T
        g["pre_logits/bias"] = t["pre_logits.fc.bias"]
    if "head.weight" in t:
        g["head/kernel"], g["head/bias"] = t["head.weight"].T, t["head.bias"]
    return g


# ------------------------------------------------------------------------------------------
# Independent numpy ViT reading timm tensors (torch semantics: y = x @ W.T + b, NCHW conv
# weights applied to NHWC images patch by patch).
# ------------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf)


def gelu(x, approximate):
    if approximate:
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def numpy_vit(t, images, *, heads=HEADS, gelu_tanh=False, eps=1e-6):
    """Returns (pooled [CLS] feature, pre_logits, logits or None)."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    images = np.asarray(images, np.float64)
    batch, height, _, _ = images.shape
    w = t["patch_embed.proj.weight"]
    dim, channels, p, _ = w.shape
    g = height // p
    patches = images.reshape(batch, g, p, g, p, channels).transpose(0, 1, 3, 5, 2, 4)
    x = patches.reshape(batch, g * g, channels * p * p) @ w.reshape(dim, -1).T
    x = x + t["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(t["cls_token"], (batch, 1, dim)), x], 1) + t["pos_embed"]
    hd = dim // heads
    layer = 0
    while f"blocks.{layer}.norm1.weight" in t:
        b = f"blocks.{layer}"
        h = layer_norm(x, t[f"{b}.norm1.weight"], t[f"{b}.norm1.bias"], eps)
        qkv = h @ t[f"{b}.attn.qkv.weight"].T + t[f"{b}.attn.qkv.bias"]
        q, k, v = qkv.reshape(batch, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = scores / scores.sum(-1, keepdims=True)
        o = (attn @ v).transpose(0, 2, 1, 3).reshape(batch, -1, dim)
        x = x + o @ t[f"{b}.attn.proj.weight"].T + t[f"{b}.attn.proj.bias"]
        h = layer_norm(x, t[f"{b}.norm2.weight"], t[f"{b}.norm2.bias"], eps)
        h = gelu(h @ t[f"{b}.mlp.fc1.weight"].T + t[f"{b}.mlp.fc1.bias"], gelu_tanh)
        x = x + h @ t[f"{b}.mlp.fc2.weight"].T + t[f"{b}.mlp.fc2.bias"]
        layer += 1
    pooled = layer_norm(x, t["norm.weight"], t["norm.bias"], eps)[:, 0]
    pre = pooled
    if "pre_logits.fc.weight" in t:
        pre = np.tanh(pooled @ t["pre_logits.fc.weight"].T + t["pre_logits.fc.bias"])
    logits = pre @ t["head.weight"].T + t["head.bias"] if "head.weight" in t else None
    return pooled, pre, logits


def images(size=IMAGE, seed=1):
    return np.random.default_rng(seed).normal(size=(2, size, size, CHANNELS)).astype(np.float32)


def write_timm(directory, tensors, model_args=None):
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    if model_args is not None:
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({"architecture": "vit_test", "num_classes": CLASSES, "global_pool": "token",
                       "model_args": model_args}, f)
    return os.path.join(directory, "model.safetensors")


def write_hf(directory, tensors, config):
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def write_npz(path, tensors):
    np.savez(path, **tensors)
    return str(path)


def assert_trees_equal(a, b):
    fa, fb = jax.tree_util.tree_flatten_with_path(a), jax.tree_util.tree_flatten_with_path(b)
    assert fa[1] == fb[1]
    for (path, x), (_, y) in zip(fa[0], fb[0]):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), path


# ------------------------------------------------------------------------------------------
# (i) each layout's forward equals the numpy ViT.
# ------------------------------------------------------------------------------------------

def test_timm_forward_matches_numpy_vit(tmp_path):
    tensors = random_timm_tensors()
    # num_heads from a timm config.json next to the file (directory path) ...
    cfg, params = load_pretrained(os.path.dirname(
        write_timm(tmp_path / "timm", tensors, model_args={"num_heads": HEADS})))
    assert detect_format(tmp_path / "timm") == "timm"
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim, cfg.patch_size,
            cfg.image_size, cfg.num_classes, cfg.num_channels) == (
        HIDDEN, LAYERS, HEADS, MLP, PATCH, IMAGE, CLASSES, CHANNELS)
    assert cfg.gelu_approximate is False and cfg.layer_norm_eps == 1e-6
    x = images()
    _, _, want = numpy_vit(tensors, x)
    np.testing.assert_allclose(vit.apply(cfg, params, x), want, atol=1e-4, rtol=1e-4)
    # ... or from config_overrides when the file stands alone.
    bare = write_timm(tmp_path / "bare", tensors)
    cfg2, params2 = load_pretrained(bare, config_overrides={"num_heads": HEADS})
    assert cfg2 == cfg
    assert_trees_equal(params, params2)


def test_google_npz_uses_tanh_gelu_and_matches_numpy_vit(tmp_path):
    tensors = random_timm_tensors(seed=3, pre_logits=24)
    cfg, params = load_pretrained(write_npz(tmp_path / "ViT-test.npz", timm_to_google(tensors)))
    assert cfg.gelu_approximate is True and cfg.representation_size == 24
    x = images()
    _, pre, want = numpy_vit(tensors, x, gelu_tanh=True)
    out = vit.apply(cfg, params, x, output="features")
    np.testing.assert_allclose(out["logits"], want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["pre_logits"], pre, atol=1e-4, rtol=1e-4)
    # Fine-tuning recipe: drop the representation layer and the head together.
    path = str(tmp_path / "ViT-test.npz")
    cfg0, params0 = load_pretrained(path, num_classes=0,
                                    config_overrides={"representation_size": None})
    assert cfg0.representation_size is None and cfg0.num_classes == 0
    assert "pre_logits" not in params0 and "head" not in params0
    pooled, _, _ = numpy_vit(tensors, x, gelu_tanh=True)
    np.testing.assert_allclose(vit.apply(cfg0, params0, x, output="pre_logits"), pooled,
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs num_classes=0"):
        load_pretrained(path, config_overrides={"representation_size": None})


def test_hf_vitmodel_without_prefix_pooler_and_tanh_act(tmp_path):
    """ViTModel layout: no 'vit.' prefix, pooler -> pre_logits, gelu_pytorch_tanh, the HF
    default eps (1e-12) when config.json omits it."""
    tensors = random_timm_tensors(seed=4, classes=0, pre_logits=HIDDEN)
    config = hf_config(architectures=["ViTModel"], hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=None)
    cfg, params = load_pretrained(write_hf(tmp_path / "hf", timm_to_hf(tensors, prefix=""), config))
    assert cfg.num_classes == 0 and cfg.representation_size == HIDDEN
    assert cfg.gelu_approximate is True and cfg.layer_norm_eps == 1e-12
    x = images()
    _, pre, _ = numpy_vit(tensors, x, gelu_tanh=True, eps=1e-12)
    np.testing.assert_allclose(vit.apply(cfg, params, x, output="pre_logits"), pre,
                               atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# (ii) the same weights in three layouts load to the same tree and forward.
# ------------------------------------------------------------------------------------------

def test_npz_hf_timm_give_the_same_model(tmp_path):
    tensors = random_timm_tensors(seed=5)
    cfg_t, p_t = load_pretrained(write_timm(tmp_path / "timm", tensors,
                                            model_args={"num_heads": HEADS}))
    hf_dir = write_hf(tmp_path / "hf", timm_to_hf(tensors), hf_config())
    cfg_h, p_h = load_pretrained(os.path.join(hf_dir, "model.safetensors"))
    assert detect_format(hf_dir) == "hf"
    cfg_g, p_g = load_pretrained(write_npz(tmp_path / "g.npz", timm_to_google(tensors)),
                                 config_overrides={"gelu_approximate": False})
    assert cfg_t == cfg_h == cfg_g
    # Layout conversions are transposes/reshapes only: the trees are bit-identical.
    assert_trees_equal(p_t, p_h)
    assert_trees_equal(p_t, p_g)
    assert fingerprint(p_t) == fingerprint(p_h) == fingerprint(p_g)
    x = images()
    ref = vit.apply(cfg_t, p_t, x)
    np.testing.assert_allclose(vit.apply(cfg_h, p_h, x), ref, atol=1e-6)
    np.testing.assert_allclose(vit.apply(cfg_g, p_g, x), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------
# (iii) own format and fingerprints.
# ------------------------------------------------------------------------------------------

def test_own_format_round_trip_and_fingerprint(tmp_path):
    tensors = random_timm_tensors(seed=6)
    cfg, params = load_pretrained(write_timm(tmp_path / "t", tensors),
                                  config_overrides={"num_heads": HEADS, "name": "demo"})
    own = tmp_path / "demo.safetensors"
    digest = save_params(own, cfg, params)
    assert digest == fingerprint(params)
    cfg2, params2 = load_params(own)
    assert cfg2 == cfg and cfg2.name == "demo"
    assert_trees_equal(params, params2)
    assert detect_format(own) == "own"
    cfg3, params3 = load_pretrained(own)
    assert cfg3 == cfg
    assert_trees_equal(params, params3)
    # The fingerprint sees a one-element change, and not the array type.
    assert fingerprint(jax.tree_util.tree_map(np.asarray, params)) == digest
    changed = jax.tree_util.tree_map(np.array, params)
    changed["Transformer"]["encoderblock_1"]["MlpBlock_3"]["Dense_1"]["bias"][3] += 1e-3
    assert fingerprint(changed) != digest
    # A file whose tensors no longer match its stored fingerprint is refused.
    flat = load_file(str(own))
    flat["cls"] = flat["cls"] + 1
    with safe_open(str(own), framework="np") as f:
        metadata = f.metadata()
    save_file(flat, str(tmp_path / "edited.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_params(tmp_path / "edited.safetensors")
    # bf16 trees round-trip exactly too.
    bf16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    save_params(tmp_path / "bf16.safetensors", cfg, bf16)
    _, back = load_params(tmp_path / "bf16.safetensors")
    assert_trees_equal(bf16, back)
    # save_params refuses a tree that does not fit the config.
    with pytest.raises(CheckpointError, match=r"'head/bias' has shape \(5,\), expected \(7,\)"):
        save_params(tmp_path / "bad.safetensors", cfg.replace(num_classes=7), params)


# ------------------------------------------------------------------------------------------
# (iv) position-embedding resize.
# ------------------------------------------------------------------------------------------

def numpy_bilinear(grid, out):
    """Half-pixel-centre bilinear resize of (g, g, D) with edge clamping (upsampling)."""
    def along(n_in):
        coords = np.clip((np.arange(out) + 0.5) * n_in / out - 0.5, 0, n_in - 1)
        lo = np.floor(coords).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, coords - lo
    g = grid.shape[0]
    lo, hi, frac = along(g)
    rows = grid[lo] * (1 - frac)[:, None, None] + grid[hi] * frac[:, None, None]
    return rows[:, lo] * (1 - frac)[None, :, None] + rows[:, hi] * frac[None, :, None]


def test_resize_pos_embedding_keeps_cls_and_interpolates_the_grid():
    pos = np.random.default_rng(7).normal(size=(1, 1 + GRID * GRID, HIDDEN)).astype(np.float32)
    grid = pos[0, 1:].reshape(GRID, GRID, HIDDEN)
    bilinear = np.asarray(resize_pos_embedding(pos, 6, method="bilinear"))
    assert bilinear.shape == (1, 37, HIDDEN)
    np.testing.assert_array_equal(bilinear[:, 0], pos[:, 0])
    np.testing.assert_allclose(bilinear[0, 1:].reshape(6, 6, HIDDEN), numpy_bilinear(grid, 6),
                               atol=1e-5)
    bicubic = np.asarray(resize_pos_embedding(pos, (6, 6)))
    np.testing.assert_array_equal(bicubic[:, 0], pos[:, 0])
    np.testing.assert_allclose(bicubic[0, 1:].reshape(6, 6, HIDDEN),
                               jax.image.resize(grid, (6, 6, HIDDEN), "bicubic"), atol=1e-6)
    np.testing.assert_array_equal(resize_pos_embedding(pos, GRID), pos)
    with pytest.raises(ValueError, match="square grid"):
        resize_pos_embedding(pos[:, :-1], 6)


def test_load_at_a_larger_image_size_runs_the_resized_model(tmp_path):
    tensors = random_timm_tensors(seed=8)
    path = write_timm(tmp_path / "t", tensors, model_args={"num_heads": HEADS})
    cfg, params = load_pretrained(path, image_size=24, resize_method="bilinear")
    assert cfg.image_size == 24
    pos = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
    np.testing.assert_array_equal(pos, resize_pos_embedding(tensors["pos_embed"], 6, "bilinear"))
    # The numpy ViT with the resized table reproduces the loaded model at 24x24.
    resized = dict(tensors, pos_embed=pos)
    x = images(size=24)
    _, _, want = numpy_vit(resized, x)
    np.testing.assert_allclose(vit.apply(cfg, params, x), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        load_pretrained(path, image_size=22)


# ------------------------------------------------------------------------------------------
# num_classes handling.
# ------------------------------------------------------------------------------------------

def test_num_classes_drops_or_requires_the_head(tmp_path):
    tensors = random_timm_tensors(seed=9)
    path = write_timm(tmp_path / "t", tensors, model_args={"num_heads": HEADS})
    cfg, params = load_pretrained(path, num_classes=0)
    assert cfg.num_classes == 0 and "head" not in params
    x = images()
    feature, _, _ = numpy_vit(tensors, x)
    np.testing.assert_allclose(vit.apply(cfg, params, x, output="pre_logits"), feature,
                               atol=1e-4, rtol=1e-4)
    assert load_pretrained(path, num_classes=CLASSES)[0].num_classes == CLASSES
    with pytest.raises(CheckpointError, match=r"5 classes.*num_classes=7.*num_classes=0"):
        load_pretrained(path, num_classes=7)


# ------------------------------------------------------------------------------------------
# (v) clear errors.
# ------------------------------------------------------------------------------------------

def test_missing_and_misshaped_tensors_are_named(tmp_path):
    tensors = random_timm_tensors(seed=10)
    missing = dict(tensors)
    del missing["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.mlp\.fc2\.bias' is missing "
                                              r"\(expected shape \(32,\)\)"):
        load_pretrained(write_timm(tmp_path / "a", missing), config_overrides={"num_heads": 2})
    misshaped = dict(tensors, **{"blocks.1.mlp.fc1.weight": np.zeros((MLP + 1, HIDDEN),
                                                                     np.float32)})
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.mlp\.fc1\.weight' has shape "
                                              r"\(65, 32\), expected \(64, 32\)"):
        load_pretrained(write_timm(tmp_path / "b", misshaped), config_overrides={"num_heads": 2})

    google = timm_to_google(tensors)
    key = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel"
    google[key] = google[key][:, :, :-1]
    with pytest.raises(CheckpointError, match=r"out/kernel' has shape \(2, 16, 31\), expected "
                                              r"\(2, 16, 32\)"):
        load_pretrained(write_npz(tmp_path / "g.npz", google))

    hf = timm_to_hf(tensors)
    del hf["vit.encoder.layer.0.attention.attention.value.weight"]
    with pytest.raises(CheckpointError, match=r"'vit\.encoder\.layer\.0\.attention\.attention"
                                              r"\.value\.weight' is missing"):
        load_pretrained(write_hf(tmp_path / "hf", hf, hf_config()))


def test_unknown_files_and_variants_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"(?s)Accepted formats.*npz.*Hugging Face.*timm"
                                              r".*save_params"):
        load_pretrained(text)
    other = tmp_path / "other.safetensors"
    save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, str(other))
    with pytest.raises(CheckpointError, match="Accepted formats"):
        load_pretrained(other)
    other_npz = write_npz(tmp_path / "other.npz", {"w": np.zeros(3)})
    with pytest.raises(CheckpointError, match="without Google ViT keys"):
        load_pretrained(other_npz)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere.npz")

    tensors = random_timm_tensors(seed=11)
    layer_scale = dict(tensors, **{"blocks.0.ls1.gamma": np.ones(HIDDEN, np.float32)})
    with pytest.raises(CheckpointError, match="layer scale"):
        load_pretrained(write_timm(tmp_path / "ls", layer_scale), config_overrides={"num_heads": 2})
    extra = dict(timm_to_hf(tensors), **{"vit.extra.weight": np.ones(3, np.float32)})
    with pytest.raises(CheckpointError, match=r"'vit\.extra\.weight'"):
        load_pretrained(write_hf(tmp_path / "hf", extra, hf_config()))
    # Width 32 is not a standard ViT: without a head count the loader asks for one.
    with pytest.raises(CheckpointError, match="num_heads"):
        load_pretrained(write_timm(tmp_path / "noheads", tensors))
    # Fields fixed by the tensors cannot be overridden.
    with pytest.raises(ValueError, match="hidden_size"):
        load_pretrained(write_npz(tmp_path / "g.npz", timm_to_google(tensors)),
                        config_overrides={"hidden_size": 64})
