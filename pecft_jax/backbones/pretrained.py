"""Pretrained ViT weights -> pecft_jax's parameter tree (and back to disk).

:func:`load_pretrained` recognises a checkpoint by its *content* (not its name) and returns
``(ViTConfig, params)`` ready for :func:`pecft_jax.backbones.vit.apply`. Accepted formats:

* **Google ``.npz``** (``ViT-B_16.npz``, AugReg ``*.npz``): flat keys joined by ``/`` that
  already follow our tree. Architecture is read from the shapes; GELU is tanh-approximate and
  LayerNorm eps 1e-6, as in Google's JAX code.
* **Hugging Face ViT safetensors** (``ViTModel`` / ``ViTForImageClassification``): a
  directory with ``model.safetensors`` and ``config.json``, or the ``.safetensors`` file
  itself (``config.json`` is then looked for next to it). ``hidden_act``, ``layer_norm_eps``
  (HF default 1e-12), ``num_attention_heads`` ... come from ``config.json``; a ``pooler``
  becomes our ``pre_logits`` (Dense + tanh, as Google's representation layer) and
  ``classifier`` our ``head``.
* **timm ViT safetensors** (``vit_base_patch16_224.augreg_in21k`` layout, fused ``qkv``):
  architecture from the shapes; ``num_heads`` from ``config_overrides``, else from a timm
  ``config.json`` next to the file (``model_args.num_heads``), else by hidden size
  (192->3, 384->6, 768->12, 1024->16, 1280->16). LayerNorm eps 1e-6, exact GELU.
* **pecft_jax safetensors** written by :func:`save_params`: flat ``/``-joined keys of our
  tree and the :class:`ViTConfig` as JSON in the safetensors metadata (the format of the
  project's demo backbone).

Tensors keep the dtype they are stored in. Every tensor the model needs is checked for
presence and shape before conversion (the error names the tensor, the expected and the
found shape), and tensors the loader would silently ignore are an error too, so a
different architecture variant never loads half-way.

Converting torch layouts: a ``Linear`` weight ``(out, in)`` becomes a kernel ``(in, out)``;
attention projections are then split per head, ``(D, H, hd)`` for query/key/value and
``(H, hd, D)`` for the output projection (torch orders output features head-major, so a
plain reshape is the per-head split); a patch ``Conv2d`` weight ``(D, C, p, p)`` becomes
``(p, p, C, D)``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import numbers
import os
import zipfile
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from pecft_jax.backbones.vit import ViTConfig, get_config, init_params, named_configs

PathLike = Union[str, os.PathLike]
FlatParams = Dict[str, np.ndarray]

OWN_FORMAT = "pecft_jax.vit/1"
ACCEPTED_FORMATS = (
    "Google ViT .npz (keys like 'Transformer/encoderblock_0/...')",
    "Hugging Face ViT safetensors (a directory with model.safetensors + config.json, "
    "or the .safetensors file)",
    "timm ViT safetensors (keys like 'blocks.0.attn.qkv.weight')",
    f"pecft_jax safetensors written by save_params (metadata format={OWN_FORMAT!r})",
)

# Default head counts of the standard ViT widths (Ti, S, B, L, H), for layouts whose
# tensors do not reveal the head split (torch fuses heads into one output dimension).
DEFAULT_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

_POS_KEY = "Transformer/posembed_input/pos_embedding"
_SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (missing/mis-shaped tensor, unknown file,
    unsupported variant, inconsistent request)."""


# --------------------------------------------------------------------------------------------
# Flat <-> nested trees, fingerprints, shape checks.
# --------------------------------------------------------------------------------------------

def flatten_params(params: Mapping[str, Any]) -> FlatParams:
    """``{'a': {'b': x}}`` -> ``{'a/b': np.asarray(x)}`` (an already flat tree stays as is)."""
    flat: FlatParams = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for key, child in node.items():
                visit(f"{prefix}/{key}" if prefix else str(key), child)
        else:
            flat[prefix] = np.asarray(node)

    visit("", params)
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """``{'a/b': x}`` -> ``{'a': {'b': x}}``."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"key {path!r} nests under a tensor")
        node[leaf] = value
    return tree


def fingerprint(params: Mapping[str, Any]) -> str:
    """SHA-256 over the sorted key paths, shapes, dtypes and bytes of a parameter tree.

    Two trees share a fingerprint only if every tensor is bit-identical, whether the leaves
    are numpy or jax arrays and whether the tree is nested or already ``/``-flat.
    Checkpoints store it to detect a different frozen backbone.
    """
    digest = hashlib.sha256()
    for path, value in sorted(flatten_params(params).items()):
        array = np.ascontiguousarray(value)
        if array.dtype.byteorder == ">":  # hash little-endian bytes, as safetensors stores them
            array = array.byteswap().view(array.dtype.newbyteorder("<"))
        digest.update(path.encode())
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(array.dtype.name.encode())  # 'bfloat16', not the ambiguous '<V2'
        digest.update(array.tobytes())
    return digest.hexdigest()


def expected_shapes(cfg: ViTConfig) -> Dict[str, Tuple[int, ...]]:
    """The flat parameter shapes the ViT of ``cfg`` needs (traced, nothing allocated)."""
    return dict(_expected_shapes_cached(cfg))


@functools.lru_cache(maxsize=32)
def _expected_shapes_cached(cfg: ViTConfig) -> tuple:
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    return tuple((path, tuple(leaf.shape)) for path, leaf in _flatten_abstract(abstract).items())


def _flatten_abstract(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, Mapping):
        out = {}
        for key, child in tree.items():
            out.update(_flatten_abstract(child, f"{prefix}/{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def check_params(cfg: ViTConfig, params: Mapping[str, Any], *, source: str = "params") -> None:
    """Raise :class:`CheckpointError` unless ``params`` has exactly the tensors (and shapes)
    the ViT of ``cfg`` needs."""
    found = {path: tuple(np.shape(v)) for path, v in flatten_params(params).items()}
    _check_flat_shapes(cfg, found, source)


def _check_flat_shapes(cfg: ViTConfig, found: Mapping[str, Tuple[int, ...]], source: str) -> None:
    wanted = expected_shapes(cfg)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing (expected shape "
                              f"{wanted[missing[0]]} for {_describe(cfg)})"
                              + (f"; {len(missing) - 1} more missing" if len(missing) > 1 else ""))
    for path, shape in wanted.items():
        if found[path] != shape:
            raise CheckpointError(f"{source}: tensor {path!r} has shape {found[path]}, expected "
                                  f"{shape} for {_describe(cfg)}")
    extra = sorted(set(found) - set(wanted))
    if extra:
        raise CheckpointError(f"{source}: tensors not used by {_describe(cfg)}: "
                              f"{_short_list(extra)}")


def _describe(cfg: ViTConfig) -> str:
    return (f"a ViT with hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} "
            f"heads, mlp {cfg.mlp_dim}, patch {cfg.patch_size}, {cfg.num_channels} channels, "
            f"image {cfg.image_size}, {cfg.num_classes} classes, representation "
            f"{cfg.representation_size}")


def _short_list(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------
# Own format.
# --------------------------------------------------------------------------------------------

def save_params(path: PathLike, cfg: ViTConfig, params: Mapping[str, Any]) -> str:
    """Write ``params`` (checked against ``cfg``) as a safetensors file with flat ``/``-joined
    keys; the config (JSON) and the fingerprint go into the safetensors metadata.
    Returns the fingerprint."""
    check_params(cfg, params, source=f"save_params({os.fspath(path)!r})")
    flat = {k: np.ascontiguousarray(v) for k, v in flatten_params(params).items()}
    digest = fingerprint(flat)
    metadata = {"format": OWN_FORMAT, "config": json.dumps(cfg.to_dict()),
                "fingerprint": digest}
    save_file(flat, os.fspath(path), metadata=metadata)
    return digest


def load_params(path: PathLike) -> Tuple[ViTConfig, dict]:
    """Read a file written by :func:`save_params`: ``(cfg, params)`` with the stored dtypes.
    The stored fingerprint is verified, so a damaged file does not load silently."""
    path = os.fspath(path)
    metadata = _safetensors_metadata(path)
    if metadata.get("format") != OWN_FORMAT:
        raise CheckpointError(f"{path} is not a pecft_jax parameter file (its safetensors "
                              f"metadata has format={metadata.get('format')!r}, expected "
                              f"{OWN_FORMAT!r}); use load_pretrained for other checkpoints")
    cfg = _config_from_metadata(path, metadata)
    flat = load_file(path)
    _check_flat_shapes(cfg, {k: v.shape for k, v in flat.items()}, path)
    _verify_fingerprint(path, flat, metadata)
    return cfg, to_jax_tree(flat)


def _verify_fingerprint(path: str, flat: Mapping[str, np.ndarray],
                        metadata: Mapping[str, str]) -> None:
    stored = metadata.get("fingerprint")
    if stored is not None and fingerprint(flat) != stored:
        raise CheckpointError(f"{path}: the tensors do not match the fingerprint stored in the "
                              f"file; the file is damaged or was edited")


def _config_from_metadata(path: str, metadata: Mapping[str, str]) -> ViTConfig:
    try:
        fields = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: metadata 'config' is missing or not JSON ({err})") from err
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{path}: config has fields this version of ViTConfig does not "
                              f"know: {unknown}")
    return ViTConfig(**fields)


def to_jax_tree(flat: Mapping[str, np.ndarray]) -> dict:
    """A loader's flat ``{"a/b/c": numpy array}`` as the nested tree of device arrays."""
    # device_put, not jnp.asarray: on jax 0.10 jnp.asarray of a numpy array compiles an
    # identity program per distinct shape (lax.stage); the values and dtypes are the same
    return unflatten_params({k: jax.device_put(v) for k, v in flat.items()})


# --------------------------------------------------------------------------------------------
# Position-embedding resize.
# --------------------------------------------------------------------------------------------

def resize_pos_embedding(pos_embedding: Any, new_grid: Union[int, Tuple[int, int]],
                         method: str = "bicubic", *, num_prefix_tokens: int = 1) -> jax.Array:
    """Resize a ``(1, prefix + g*g, D)`` position embedding to a ``new_grid`` of patches.

    The first ``num_prefix_tokens`` rows (the [CLS] position) are kept as they are; the
    ``g x g`` patch grid is interpolated with :func:`jax.image.resize` (``'bicubic'`` or
    ``'bilinear'``, half-pixel centres; antialiased when shrinking). Returns the input dtype.
    """
    if method not in ("bicubic", "bilinear"):
        raise ValueError(f"method must be 'bicubic' or 'bilinear', got {method!r}")
    pos = jnp.asarray(pos_embedding)
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"pos_embedding must have shape (1, tokens, D); got {pos.shape}")
    if isinstance(new_grid, numbers.Integral):
        new_h = new_w = int(new_grid)
    else:
        new_h, new_w = (int(n) for n in new_grid)
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"new_grid must be positive, got {new_grid}")
    old_tokens = pos.shape[1] - num_prefix_tokens
    old = math.isqrt(max(old_tokens, 0))
    if old_tokens <= 0 or old * old != old_tokens:
        raise ValueError(f"pos_embedding has {pos.shape[1]} positions, which is not "
                         f"{num_prefix_tokens} prefix position(s) + a square grid")
    if (old, old) == (new_h, new_w):
        return pos
    dim = pos.shape[2]
    grid = pos[0, num_prefix_tokens:].reshape(old, old, dim).astype(jnp.float32)
    resized = jax.image.resize(grid, (new_h, new_w, dim), method=method)
    resized = resized.reshape(1, new_h * new_w, dim).astype(pos.dtype)
    return jnp.concatenate([pos[:, :num_prefix_tokens], resized], axis=1)


# --------------------------------------------------------------------------------------------
# Reading checkpoints.
# --------------------------------------------------------------------------------------------

class _Tensors:
    """The tensors of one checkpoint, with presence/shape checks and use tracking."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self.tensors = dict(tensors)
        self.source = source
        self.used: set = set()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str, expected: str) -> Tuple[int, ...]:
        """Shape of a tensor used to infer the architecture (``expected`` is symbolic)."""
        if key not in self.tensors:
            raise CheckpointError(f"{self.source}: tensor {key!r} is missing (expected shape "
                                  f"{expected}); it is needed to infer the architecture")
        return tuple(self.tensors[key].shape)

    def take(self, key: str, expected: Tuple[int, ...]) -> np.ndarray:
        if key not in self.tensors:
            raise CheckpointError(f"{self.source}: tensor {key!r} is missing (expected shape "
                                  f"{tuple(expected)})")
        value = np.asarray(self.tensors[key])
        if tuple(value.shape) != tuple(expected):
            raise CheckpointError(f"{self.source}: tensor {key!r} has shape {tuple(value.shape)},"
                                  f" expected {tuple(expected)}")
        self.used.add(key)
        return value

    def refuse_leftovers(self, what: str, ignore: Iterable[str] = ()) -> None:
        left = sorted(set(self.tensors) - self.used - set(ignore))
        if left:
            raise CheckpointError(f"{self.source}: tensors that a plain {what} ViT does not have: "
                                  f"{_short_list(left)}. This loader converts the standard "
                                  f"ViT only; the checkpoint is a different variant")


@dataclasses.dataclass
class _Checkpoint:
    kind: str                       # 'npz' | 'hf' | 'timm' | 'own'
    file: str
    tensors: Mapping[str, np.ndarray]
    config_json: Optional[dict] = None
    metadata: Optional[dict] = None


def detect_format(path: PathLike) -> str:
    """``'npz'``, ``'hf'``, ``'timm'`` or ``'own'`` for a checkpoint path (by content)."""
    kind, _, _ = _locate(os.fspath(path))
    return kind


def _unknown(path: str, why: str) -> CheckpointError:
    accepted = "\n  - ".join(ACCEPTED_FORMATS)
    return CheckpointError(f"cannot load {path}: {why}. Accepted formats:\n  - {accepted}")


def _safetensors_metadata(path: str) -> dict:
    with safe_open(path, framework="np") as handle:
        return dict(handle.metadata() or {})


def _safetensors_keys(path: str) -> list:
    with safe_open(path, framework="np") as handle:
        return list(handle.keys())


def _looks_like_safetensors(path: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= _SAFETENSORS_HEADER_LIMIT and head[8:9] == b"{"


def _classify_safetensors(path: str) -> str:
    try:
        metadata, keys = _safetensors_metadata(path), set(_safetensors_keys(path))
    except Exception as err:  # the Rust reader raises its own error types
        raise _unknown(path, f"it starts like a safetensors file but cannot be read "
                             f"({err})") from err
    if metadata.get("format") == OWN_FORMAT:
        return "own"
    if any(k.startswith(("vit.embeddings.", "embeddings.patch_embeddings.")) for k in keys):
        return "hf"
    if any(k.endswith("patch_embed.proj.weight") for k in keys):
        return "timm"
    raise _unknown(path, f"a safetensors file with neither HF ViT keys ('vit.embeddings...') nor "
                         f"timm ViT keys ('patch_embed.proj.weight'); first keys: "
                         f"{_short_list(sorted(keys), 5)}")


def _locate(path: str) -> Tuple[str, str, Optional[str]]:
    """(format, tensor file, config.json path or None)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if os.path.isdir(path):
        files = sorted(os.listdir(path))
        candidates = [f for f in files if f.endswith(".safetensors")]
        if "model.safetensors" in candidates:
            candidates = ["model.safetensors"]
        if len(candidates) != 1:
            npz = [f for f in files if f.endswith(".npz")]
            if not candidates and len(npz) == 1:
                candidates = npz
            elif not candidates:
                torch_files = [f for f in files if f.endswith((".bin", ".pth", ".pt"))]
                hint = (f" (found torch pickles {torch_files}: download the .safetensors "
                        f"version of the model instead)" if torch_files else "")
                raise _unknown(path, f"the directory holds no .safetensors or .npz file{hint}")
            else:
                raise _unknown(path, f"the directory holds several weight files {candidates}; "
                                     f"pass the one to load")
        path = os.path.join(path, candidates[0])
    config = os.path.join(os.path.dirname(path) or ".", "config.json")
    config = config if os.path.isfile(config) else None
    if zipfile.is_zipfile(path):
        return "npz", path, None
    if _looks_like_safetensors(path):
        return _classify_safetensors(path), path, config
    raise _unknown(path, "it is neither a .npz archive nor a safetensors file")


def _read(path: str) -> _Checkpoint:
    kind, file, config_path = _locate(path)
    if kind == "npz":
        try:
            with np.load(file, allow_pickle=False) as archive:
                tensors = {k: archive[k] for k in archive.files}
        except ValueError as err:
            raise _unknown(file, f"the .npz could not be read without pickles ({err})") from err
        if "embedding/kernel" not in tensors and not any(k.startswith("Transformer/")
                                                          for k in tensors):
            raise _unknown(file, f"a .npz without Google ViT keys ('embedding/kernel', "
                                 f"'Transformer/...'); first keys: "
                                 f"{_short_list(sorted(tensors), 5)}")
        return _Checkpoint("npz", file, tensors)
    tensors = load_file(file)
    if kind == "own":
        metadata = _safetensors_metadata(file)
        _verify_fingerprint(file, tensors, metadata)
        return _Checkpoint("own", file, tensors, metadata=metadata)
    config_json = None
    if config_path is not None:
        with open(config_path) as handle:
            config_json = json.load(handle)
    return _Checkpoint(kind, file, tensors, config_json=config_json)


# --------------------------------------------------------------------------------------------
# Architecture inference per format. Each returns the checkpoint's ViTConfig fields and the
# set of fields its tensor shapes pin down (those cannot be overridden).
# --------------------------------------------------------------------------------------------

_SHAPE_FIELDS = ("patch_size", "hidden_size", "num_layers", "mlp_dim", "num_channels")


def _grid_from_positions(source: str, key: str, positions: int, patch: int) -> int:
    grid = math.isqrt(max(positions - 1, 0))
    if positions < 2 or grid * grid != positions - 1:
        raise CheckpointError(f"{source}: {key!r} has {positions} positions; expected 1 class "
                              f"token + a square grid of patches (models without a class token "
                              f"are not supported)")
    return grid * patch


def _count_layers(keys: Iterable[str], prefix: str, source: str, example: str) -> int:
    indices = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".")[0].split("/")[0]
            if head.isdigit():
                indices.add(int(head))
    if not indices:
        raise CheckpointError(f"{source}: no transformer blocks found (expected tensors like "
                              f"{example!r})")
    return max(indices) + 1  # a gap in the numbering shows up as a missing tensor later


def _name_for(fields: Mapping[str, Any]) -> str:
    arch = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "num_channels")
    for name in named_configs():
        named = get_config(name)
        if all(getattr(named, f) == fields[f] for f in arch):
            return name
    return (f"ViT-D{fields['hidden_size']}-L{fields['num_layers']}-H{fields['num_heads']}"
            f"/{fields['patch_size']}")


def _infer_npz(ckpt: _Checkpoint) -> Tuple[dict, set]:
    t = _Tensors(ckpt.tensors, ckpt.file)
    if not t.has("cls"):
        raise CheckpointError(f"{ckpt.file}: tensor 'cls' is missing; checkpoints without a "
                              f"class token (classifier='gap' or hybrid models) are not supported")
    patch, patch_w, channels, hidden = t.shape("embedding/kernel", "(p, p, C, D)")
    block = "Transformer/encoderblock_0"
    _, heads, _ = t.shape(f"{block}/MultiHeadDotProductAttention_1/query/kernel", "(D, H, hd)")
    _, mlp = t.shape(f"{block}/MlpBlock_3/Dense_0/kernel", "(D, mlp)")
    _, positions, _ = t.shape(_POS_KEY, "(1, 1 + grid*grid, D)")
    fields = dict(patch_size=patch, hidden_size=hidden, num_heads=heads, mlp_dim=mlp,
                  num_channels=channels,
                  num_layers=_count_layers(ckpt.tensors, "Transformer/encoderblock_", ckpt.file,
                                           f"{block}/LayerNorm_0/scale"),
                  image_size=_grid_from_positions(ckpt.file, _POS_KEY, positions, patch),
                  num_classes=t.shape("head/kernel", "(D, classes)")[1] if t.has("head/kernel")
                  else 0,
                  representation_size=(t.shape("pre_logits/kernel", "(D, R)")[1]
                                       if t.has("pre_logits/kernel") else None),
                  gelu_approximate=True, layer_norm_eps=1e-6, classifier="token")
    return fields, set(_SHAPE_FIELDS) | {"num_heads"}


_HF_ACT_APPROXIMATE = {"gelu": False, "gelu_python": False, "gelu_new": True,
                       "gelu_pytorch_tanh": True, "gelu_fast": True}


def _hf_prefix(tensors: Mapping[str, np.ndarray]) -> str:
    return "vit." if any(k.startswith("vit.embeddings.") for k in tensors) else ""


def _heads_by_width(source: str, hidden: int, overrides: Mapping[str, Any]) -> int:
    if "num_heads" in overrides:
        return int(overrides["num_heads"])
    if hidden in DEFAULT_HEADS_BY_WIDTH:
        return DEFAULT_HEADS_BY_WIDTH[hidden]
    raise CheckpointError(f"{source}: cannot tell the number of attention heads of a ViT with "
                          f"hidden size {hidden} from its tensors; pass "
                          f"config_overrides={{'num_heads': H}}")


def _infer_hf(ckpt: _Checkpoint, overrides: Mapping[str, Any]) -> Tuple[dict, set]:
    t = _Tensors(ckpt.tensors, ckpt.file)
    pre = _hf_prefix(ckpt.tensors)
    conf = dict(ckpt.config_json or {})
    model_type = conf.get("model_type", "vit")
    if model_type != "vit":
        raise CheckpointError(f"{ckpt.file}: config.json has model_type={model_type!r}; only "
                              f"Hugging Face 'vit' models are supported")
    hidden, channels, patch, _ = t.shape(f"{pre}embeddings.patch_embeddings.projection.weight",
                                         "(D, C, p, p)")
    mlp, _ = t.shape(f"{pre}encoder.layer.0.intermediate.dense.weight", "(mlp, D)")
    _, positions, _ = t.shape(f"{pre}embeddings.position_embeddings", "(1, 1 + grid*grid, D)")
    act = conf.get("hidden_act", "gelu")
    if act not in _HF_ACT_APPROXIMATE:
        raise CheckpointError(f"{ckpt.file}: config.json hidden_act={act!r} is not supported; "
                              f"known: {sorted(_HF_ACT_APPROXIMATE)}")
    if conf.get("pooler_act", "tanh") != "tanh" and t.has("pooler.dense.weight"):
        raise CheckpointError(f"{ckpt.file}: pooler_act={conf['pooler_act']!r}; only a tanh "
                              f"pooler maps onto pre_logits")
    if "num_attention_heads" in conf:
        heads = int(conf["num_attention_heads"])
    else:
        heads = _heads_by_width(ckpt.file, hidden, overrides)
    fields = dict(patch_size=patch, hidden_size=hidden, num_heads=heads, mlp_dim=mlp,
                  num_channels=channels,
                  num_layers=_count_layers(ckpt.tensors, f"{pre}encoder.layer.", ckpt.file,
                                           f"{pre}encoder.layer.0.layernorm_before.weight"),
                  image_size=_grid_from_positions(ckpt.file, f"{pre}embeddings.position_embeddings",
                                                  positions, patch),
                  num_classes=(t.shape("classifier.weight", "(classes, D)")[0]
                               if t.has("classifier.weight") else 0),
                  representation_size=(t.shape("pooler.dense.weight", "(R, D)")[0]
                                       if t.has("pooler.dense.weight") else None),
                  gelu_approximate=_HF_ACT_APPROXIMATE[act],
                  layer_norm_eps=float(conf.get("layer_norm_eps", 1e-12)), classifier="token")
    # A config.json that disagrees with the tensors belongs to another checkpoint.
    declared = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
                "intermediate_size": "mlp_dim", "patch_size": "patch_size",
                "num_channels": "num_channels", "image_size": "image_size"}
    for json_key, field in declared.items():
        if json_key in conf and int(conf[json_key]) != fields[field]:
            raise CheckpointError(f"{ckpt.file}: config.json says {json_key}={conf[json_key]} "
                                  f"but the tensors give {fields[field]}")
    pinned = set(_SHAPE_FIELDS) | ({"num_heads"} if "num_attention_heads" in conf else set())
    return fields, pinned


_TIMM_UNSUPPORTED = {
    "fc_norm.": "fc_norm (pool-then-norm heads)",
    ".ls1.": "layer scale",
    "reg_token": "register tokens",
    "norm_pre.": "a pre-norm (CLIP-style) stem",
    ".q_norm.": "query/key normalisation",
    "attn_pool.": "attention pooling (MAP head)",
    "dist_token": "a distillation token (DeiT)",
}


def _timm_prefix(tensors: Mapping[str, np.ndarray]) -> str:
    # HF's TimmWrapper stores timm models under 'timm_model.'.
    return "timm_model." if any(k.startswith("timm_model.") for k in tensors) else ""


def _infer_timm(ckpt: _Checkpoint, overrides: Mapping[str, Any]) -> Tuple[dict, set]:
    t = _Tensors(ckpt.tensors, ckpt.file)
    pre = _timm_prefix(ckpt.tensors)
    for marker, what in _TIMM_UNSUPPORTED.items():
        hits = [k for k in ckpt.tensors if marker in k]
        if hits:
            raise CheckpointError(f"{ckpt.file}: tensor {hits[0]!r} belongs to a timm ViT variant "
                                  f"with {what}, which this ViT does not implement")
    conf = dict(ckpt.config_json or {})
    hidden, channels, patch, _ = t.shape(f"{pre}patch_embed.proj.weight", "(D, C, p, p)")
    mlp, _ = t.shape(f"{pre}blocks.0.mlp.fc1.weight", "(mlp, D)")
    _, positions, _ = t.shape(f"{pre}pos_embed", "(1, 1 + grid*grid, D)")
    model_args = conf.get("model_args") or {}
    pinned = set(_SHAPE_FIELDS)
    if "num_heads" in model_args:
        heads = int(model_args["num_heads"])
        pinned.add("num_heads")
    else:
        heads = _heads_by_width(ckpt.file, hidden, overrides)
    pool = conf.get("global_pool", model_args.get("global_pool", "token"))
    if pool not in ("token", "avg", "", None):
        raise CheckpointError(f"{ckpt.file}: global_pool={pool!r} is not supported (use 'token' "
                              f"or 'avg')")
    fields = dict(patch_size=patch, hidden_size=hidden, num_heads=heads, mlp_dim=mlp,
                  num_channels=channels,
                  num_layers=_count_layers(ckpt.tensors, f"{pre}blocks.", ckpt.file,
                                           f"{pre}blocks.0.norm1.weight"),
                  image_size=_grid_from_positions(ckpt.file, f"{pre}pos_embed", positions, patch),
                  num_classes=(t.shape(f"{pre}head.weight", "(classes, D)")[0]
                               if t.has(f"{pre}head.weight") else 0),
                  representation_size=(t.shape(f"{pre}pre_logits.fc.weight", "(R, D)")[0]
                                       if t.has(f"{pre}pre_logits.fc.weight") else None),
                  gelu_approximate=False, layer_norm_eps=1e-6,
                  classifier="gap" if pool == "avg" else "token")
    return fields, pinned


def _infer_own(ckpt: _Checkpoint) -> Tuple[dict, set]:
    cfg = _config_from_metadata(ckpt.file, ckpt.metadata or {})
    return cfg.to_dict(), set(_SHAPE_FIELDS) | {"num_heads"}


# --------------------------------------------------------------------------------------------
# Conversion per format: checkpoint tensors -> our flat tree for the ViT of ``cfg``.
# --------------------------------------------------------------------------------------------

def _linear(t: _Tensors, name: str, d_in: int, d_out: int) -> Tuple[np.ndarray, np.ndarray]:
    """A torch ``Linear`` as a Flax ``Dense``: kernel ``(in, out)`` and bias."""
    return t.take(f"{name}.weight", (d_out, d_in)).T, t.take(f"{name}.bias", (d_out,))


def _layer_norm(t: _Tensors, name: str, dim: int) -> dict:
    return {"scale": t.take(f"{name}.weight", (dim,)), "bias": t.take(f"{name}.bias", (dim,))}


def _heads_in(kernel: np.ndarray, bias: np.ndarray, cfg: ViTConfig) -> dict:
    """Dense (D, D) projection -> DenseGeneral to (H, hd)."""
    shape = (cfg.num_heads, cfg.head_dim)
    return {"kernel": kernel.reshape(cfg.hidden_size, *shape), "bias": bias.reshape(shape)}


def _heads_out(kernel: np.ndarray, bias: np.ndarray, cfg: ViTConfig) -> dict:
    """Dense (D, D) projection from concatenated heads -> DenseGeneral from (H, hd)."""
    return {"kernel": kernel.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size), "bias": bias}


def _dense(kernel: np.ndarray, bias: np.ndarray) -> dict:
    return {"kernel": kernel, "bias": bias}


def _patch_conv(t: _Tensors, name: str, cfg: ViTConfig) -> dict:
    p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
    weight = t.take(f"{name}.weight", (d, c, p, p))
    return {"kernel": weight.transpose(2, 3, 1, 0), "bias": t.take(f"{name}.bias", (d,))}


def _stem_and_heads(tree: dict, t: _Tensors, cfg: ViTConfig, *, cls: str, pos: str,
                    norm: str, head: str, pre_logits: str) -> None:
    d = cfg.hidden_size
    tree["cls"] = t.take(cls, (1, 1, d))
    positions = t.take(pos, (1, cfg.num_patches + 1, d))
    tree["Transformer"]["posembed_input"] = {"pos_embedding": positions}
    tree["Transformer"]["encoder_norm"] = _layer_norm(t, norm, d)
    feature = d
    if cfg.representation_size is not None:
        tree["pre_logits"] = _dense(*_linear(t, pre_logits, d, cfg.representation_size))
        feature = cfg.representation_size
    if cfg.num_classes:
        tree["head"] = _dense(*_linear(t, head, feature, cfg.num_classes))


def _encoder_block(t: "_Tensors", cfg: ViTConfig, attention: dict, *, norm1: str, norm2: str,
                   fc1: str, fc2: str) -> dict:
    """One ``encoderblock_N`` in Google's layout from torch-layout tensor names."""
    d, m = cfg.hidden_size, cfg.mlp_dim
    return {"LayerNorm_0": _layer_norm(t, norm1, d),
            "MultiHeadDotProductAttention_1": attention,
            "LayerNorm_2": _layer_norm(t, norm2, d),
            "MlpBlock_3": {"Dense_0": _dense(*_linear(t, fc1, d, m)),
                           "Dense_1": _dense(*_linear(t, fc2, m, d))}}


def _convert_hf(ckpt: _Checkpoint, cfg: ViTConfig) -> FlatParams:
    t = _Tensors(ckpt.tensors, ckpt.file)
    pre = _hf_prefix(ckpt.tensors)
    d = cfg.hidden_size
    qkv_bias = bool((ckpt.config_json or {}).get("qkv_bias", True))
    tree: dict = {"embedding": _patch_conv(t, f"{pre}embeddings.patch_embeddings.projection", cfg),
                  "Transformer": {}}
    for layer in range(cfg.num_layers):
        src = f"{pre}encoder.layer.{layer}"
        attention = {}
        for name in ("query", "key", "value"):
            key = f"{src}.attention.attention.{name}"
            kernel = t.take(f"{key}.weight", (d, d)).T
            # qkv_bias=False models have no bias tensors; a zero bias is the same function.
            bias = t.take(f"{key}.bias", (d,)) if qkv_bias else np.zeros((d,), kernel.dtype)
            attention[name] = _heads_in(kernel, bias, cfg)
        attention["out"] = _heads_out(*_linear(t, f"{src}.attention.output.dense", d, d), cfg)
        tree["Transformer"][f"encoderblock_{layer}"] = _encoder_block(
            t, cfg, attention, norm1=f"{src}.layernorm_before", norm2=f"{src}.layernorm_after",
            fc1=f"{src}.intermediate.dense", fc2=f"{src}.output.dense")
    _stem_and_heads(tree, t, cfg, cls=f"{pre}embeddings.cls_token",
                    pos=f"{pre}embeddings.position_embeddings", norm=f"{pre}layernorm",
                    head="classifier", pre_logits="pooler.dense")
    t.refuse_leftovers("Hugging Face", ignore=[f"{pre}embeddings.mask_token"])
    return flatten_params(tree)


def _convert_timm(ckpt: _Checkpoint, cfg: ViTConfig) -> FlatParams:
    t = _Tensors(ckpt.tensors, ckpt.file)
    pre = _timm_prefix(ckpt.tensors)
    d = cfg.hidden_size
    tree: dict = {"embedding": _patch_conv(t, f"{pre}patch_embed.proj", cfg), "Transformer": {}}
    for layer in range(cfg.num_layers):
        src = f"{pre}blocks.{layer}"
        fused = t.take(f"{src}.attn.qkv.weight", (3 * d, d))
        fused_bias = (t.take(f"{src}.attn.qkv.bias", (3 * d,)) if t.has(f"{src}.attn.qkv.bias")
                      else np.zeros((3 * d,), fused.dtype))  # qkv_bias=False variants
        # timm's fused rows are [query; key; value], each head-major.
        attention = {name: _heads_in(fused[i * d:(i + 1) * d].T, fused_bias[i * d:(i + 1) * d], cfg)
                     for i, name in enumerate(("query", "key", "value"))}
        attention["out"] = _heads_out(*_linear(t, f"{src}.attn.proj", d, d), cfg)
        tree["Transformer"][f"encoderblock_{layer}"] = _encoder_block(
            t, cfg, attention, norm1=f"{src}.norm1", norm2=f"{src}.norm2",
            fc1=f"{src}.mlp.fc1", fc2=f"{src}.mlp.fc2")
    _stem_and_heads(tree, t, cfg, cls=f"{pre}cls_token", pos=f"{pre}pos_embed",
                    norm=f"{pre}norm", head=f"{pre}head", pre_logits=f"{pre}pre_logits.fc")
    t.refuse_leftovers("timm")
    return flatten_params(tree)


def _convert_same_layout(ckpt: _Checkpoint, cfg: ViTConfig, what: str) -> FlatParams:
    """npz and own files already use our flat keys: check and take each expected tensor."""
    t = _Tensors(ckpt.tensors, ckpt.file)
    flat = {path: t.take(path, shape) for path, shape in expected_shapes(cfg).items()}
    t.refuse_leftovers(what)
    return flat


# --------------------------------------------------------------------------------------------
# Public loader.
# --------------------------------------------------------------------------------------------

def _merge_overrides(source: str, fields: dict, pinned: set,
                     overrides: Mapping[str, Any]) -> dict:
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    merged = dict(fields)
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"config_overrides: unknown ViTConfig field {key!r}; fields: "
                             f"{sorted(known)}")
        if key in ("image_size", "num_classes"):
            raise ValueError(f"config_overrides: set {key} with the load_pretrained({key}=...) "
                             f"argument, which also adapts the weights")
        if key == "representation_size":
            if value is not None and value != fields[key]:
                raise ValueError(f"config_overrides: representation_size can only be dropped "
                                 f"(None); the checkpoint's is {fields[key]}")
            continue  # dropping pre_logits happens after conversion
        if key in pinned and value != fields[key]:
            raise ValueError(f"config_overrides sets {key}={value!r}, but {source} has "
                             f"{key}={fields[key]!r} (fixed by its tensor shapes or config)")
        merged[key] = value
    return merged


def load_pretrained(path: PathLike, *, image_size: Optional[int] = None,
                    num_classes: Optional[int] = None,
                    config_overrides: Optional[Mapping[str, Any]] = None,
                    resize_method: str = "bicubic") -> Tuple[ViTConfig, dict]:
    """Load a pretrained ViT checkpoint (format recognised by content) as ``(cfg, params)``.

    Args:
      path: a ``.npz`` / ``.safetensors`` file, or a directory holding one (plus
        ``config.json`` for Hugging Face / timm). See the module docstring for the formats.
      image_size: input resolution to use. When it differs from the checkpoint's, the patch
        grid of the position embedding is resized (:func:`resize_pos_embedding`, keeping
        [CLS]); it must be a multiple of the patch size.
      num_classes: ``None`` keeps the checkpoint's head as it is (``cfg.num_classes`` is its
        class count, 0 when it has none); ``0`` drops the head (``pre_logits`` is kept);
        ``k > 0`` requires the checkpoint head to have exactly ``k`` classes, otherwise an
        error -- train a new head on ``output='pre_logits'`` instead of reusing a wrong one.
      config_overrides: ViTConfig fields to change: ``name``, ``gelu_approximate``,
        ``layer_norm_eps``, ``classifier``, ``num_heads`` (only where the layout does not fix
        it: timm and HF without ``config.json``), ``representation_size=None`` (drops
        ``pre_logits``). Fields fixed by the tensors may be repeated but not changed.
      resize_method: ``'bicubic'`` or ``'bilinear'`` for the position-embedding resize.

    Returns:
      ``(cfg, params)``: the config and a nested dict of jax arrays in the stored dtype.
    """
    path = os.fspath(path)
    overrides = dict(config_overrides or {})
    ckpt = _read(path)
    if ckpt.kind == "npz":
        fields, pinned = _infer_npz(ckpt)
    elif ckpt.kind == "hf":
        fields, pinned = _infer_hf(ckpt, overrides)
    elif ckpt.kind == "timm":
        fields, pinned = _infer_timm(ckpt, overrides)
    else:
        fields, pinned = _infer_own(ckpt)
    fields = _merge_overrides(ckpt.file, fields, pinned, overrides)
    if "name" not in overrides and ckpt.kind != "own":
        fields["name"] = _name_for(fields)
    cfg = ViTConfig(**fields)

    if ckpt.kind == "hf":
        flat = _convert_hf(ckpt, cfg)
    elif ckpt.kind == "timm":
        flat = _convert_timm(ckpt, cfg)
    else:
        flat = _convert_same_layout(ckpt, cfg, "Google" if ckpt.kind == "npz" else "pecft_jax")

    if "representation_size" in overrides and overrides["representation_size"] is None:
        if cfg.representation_size is not None and cfg.num_classes and num_classes != 0:
            raise ValueError(f"{ckpt.file}: the head reads the {cfg.representation_size}-wide "
                             f"pre_logits; dropping them (representation_size=None) needs "
                             f"num_classes=0 too")
        flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
        cfg = cfg.replace(representation_size=None)
    if num_classes is not None:
        if num_classes == 0:
            flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
        elif num_classes != cfg.num_classes:
            have = (f"a head with {cfg.num_classes} classes" if cfg.num_classes
                    else "no classification head")
            raise CheckpointError(f"{ckpt.file} has {have}, but num_classes={num_classes} was "
                                  f"asked; pass num_classes=0 to drop the head (and train your "
                                  f"own on output='pre_logits') or None to keep it")
        cfg = cfg.replace(num_classes=num_classes)
    if image_size is not None and image_size != cfg.image_size:
        if image_size <= 0 or image_size % cfg.patch_size:
            raise ValueError(f"image_size={image_size} must be a positive multiple of the patch "
                             f"size {cfg.patch_size}")
        flat[_POS_KEY] = np.asarray(resize_pos_embedding(
            flat[_POS_KEY], image_size // cfg.patch_size, method=resize_method))
        cfg = cfg.replace(image_size=image_size)
    _check_flat_shapes(cfg, {k: v.shape for k, v in flat.items()}, ckpt.file)
    return cfg, to_jax_tree(flat)
