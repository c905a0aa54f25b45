"""Labelled text and its tokenisation: :class:`TextSource` (what text readers return and
scenarios split into tasks), :class:`TextTokenizer` (text -> ``token_ids`` /
``attention_mask`` arrays for the BERT encoder) and :class:`TextPreprocess` (the pipeline's
text counterpart of the image ``Preprocess``).

The tokenizer is a thin wrapper over the ``tokenizers`` package
(``Tokenizer.from_file('tokenizer.json')``). Padding and truncation are always set here
from the caller's arguments: a ``tokenizer.json`` may carry its own (all-MiniLM-L6-v2's
pads and truncates to a fixed 128 tokens), which is switched off first, so the result
never depends on what the file says.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Sequence, Union

import numpy as np

from pecft_jax.data.sources import LabelledSource, _check_labels

PADDINGS = ("longest", "max_length")


class TextTokenizer:
    """``TextTokenizer(path, max_length=256)(texts)`` -> ``{'token_ids', 'attention_mask',
    'token_type_ids'}``, int32 numpy arrays ``(B, T)``.

    Args:
      path: a ``tokenizer.json`` file, or a directory holding one.
      max_length: every sequence is truncated to at most this many tokens, special tokens
        ([CLS], [SEP]) included (sentence-transformers' ``max_seq_length``).
      padding: ``'longest'`` pads to the longest sequence of the batch (rounded up to
        ``pad_to_multiple_of`` if given, to bound the number of compiled shapes);
        ``'max_length'`` pads every batch to exactly ``max_length``.
      pad_token: the padding token; its id comes from the vocabulary.
    """

    def __init__(self, path: Union[str, os.PathLike], max_length: int, *,
                 padding: str = "longest", pad_to_multiple_of: Optional[int] = None,
                 pad_token: str = "[PAD]"):
        from tokenizers import Tokenizer

        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if int(max_length) < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got "
                             f"{max_length}")
        if pad_to_multiple_of is not None and int(pad_to_multiple_of) < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        tokenizer = Tokenizer.from_file(path)
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{path}: the vocabulary has no padding token {pad_token!r}")
        # The file's own settings off first, then ours.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=int(max_length))
        tokenizer.enable_padding(
            pad_id=pad_id, pad_token=pad_token,
            length=int(max_length) if padding == "max_length" else None,
            pad_to_multiple_of=None if padding == "max_length" else pad_to_multiple_of)
        self.tokenizer = tokenizer
        self.path = path
        self.max_length = int(max_length)
        self.padding = padding
        self.pad_id = pad_id

    def __call__(self, texts: Sequence[str]) -> Dict[str, np.ndarray]:
        if isinstance(texts, str):
            raise TypeError("pass a sequence of texts, not one string")
        texts = list(texts)
        if not texts:
            raise ValueError("no texts to tokenize")
        encodings = self.tokenizer.encode_batch(texts)
        return {"token_ids": np.asarray([e.ids for e in encodings], np.int32),
                "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
                "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32)}


class TextSource(LabelledSource):
    """In-memory labelled texts: ``texts`` (N strings) and ``labels`` (N,).

    ``origin_indices`` (optional) gives each example's row in the file it was split from,
    so callers can check that a train and a test split never share an example.
    """

    modality = "text"

    def __init__(self, texts: Sequence[str], labels: np.ndarray, *, name: str, split: str,
                 class_names: Sequence[str], origin_indices: Optional[np.ndarray] = None):
        self.name, self.split = name, split
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.labels = _check_labels(labels, self.num_classes, name)
        self._texts = list(texts)
        if len(self._texts) != len(self.labels):
            raise ValueError(f"{name}: {len(self._texts)} texts but {len(self.labels)} labels")
        bad = [i for i, t in enumerate(self._texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"{name} ({split}): examples {bad[:5]} are empty or not strings")
        self.origin_indices = (None if origin_indices is None
                               else np.asarray(origin_indices, dtype=np.int64))

    def texts(self, indices: np.ndarray) -> list:
        return [self._texts[i] for i in self._check_indices(indices).tolist()]

    def __repr__(self) -> str:
        return (f"TextSource(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes})")


@dataclasses.dataclass(frozen=True, eq=False)
class TextPreprocess:
    """Texts -> the text backbone's inputs ``{'token_ids', 'attention_mask'}`` (int32
    ``(b, max_length)``): every batch is padded to the same length, so a run compiles each
    kind of step once. Text is never augmented (``augment`` exists so the pipeline treats
    both modalities alike)."""
    tokenizer: TextTokenizer
    augment: bool = False

    @property
    def augments(self) -> bool:
        return False

    def __call__(self, texts: Sequence[str]) -> Dict[str, np.ndarray]:
        encoded = self.tokenizer(texts)
        return {"token_ids": encoded["token_ids"], "attention_mask": encoded["attention_mask"]}
