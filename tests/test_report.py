"""pecft_jax.report over many runs: grouping by setting, mean +- std, tables, plots."""
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from pecft_jax import metrics, plots, report


def fake_run(matrix, seed, method="l2p", lr=0.01, progress_bar=False, seconds=(1.0, 2.0, 3.0)):
    """A results.json as the loop writes it, from an accuracy matrix."""
    return {"method": method, "dataset": "mnist5k", "num_tasks": len(matrix),
            "accuracy_matrix": matrix, "task_il_accuracy_matrix": matrix,
            "metrics": metrics.summarize(matrix, test_sizes=[10] * len(matrix)),
            "task_il_metrics": metrics.summarize(matrix), "trainable_params": 1234,
            "seconds_per_task": list(seconds), "class_order": list(range(6)),
            "config": {"seed": seed, "progress_bar": progress_bar,
                       "method": {"name": method}, "train": {"learning_rate": lr}}}


MATRICES = [[[90.0], [70.0, 80.0], [60.0, 50.0, 85.0]],
            [[95.0], [65.0, 75.0], [55.0, 60.0, 80.0]],
            [[85.0], [75.0, 70.0], [65.0, 40.0, 90.0]]]


def test_runs_group_by_setting_not_seed_nor_execution_keys():
    runs = [fake_run(m, seed) for seed, m in enumerate(MATRICES)]
    runs[1]["config"]["progress_bar"] = True  # how it ran, not what it computed
    runs.append(fake_run(MATRICES[0], 0, lr=0.1))
    runs.append(fake_run(MATRICES[1], 0, method="simplecil"))
    groups = report.group_runs(runs)
    assert [label for label, _ in groups] == ["l2p [train.learning_rate=0.01]",
                                              "l2p [train.learning_rate=0.1]", "simplecil"]
    assert [len(members) for _, members in groups] == [3, 1, 1]


def test_summary_is_the_mean_and_sample_std_over_seeds():
    runs = [fake_run(m, seed) for seed, m in enumerate(MATRICES)]
    (row,) = report.summarize_groups(report.group_runs(runs))
    finals = [np.mean(m[-1]) for m in MATRICES]
    assert row["final avg acc"][0] == pytest.approx(np.mean(finals))
    assert row["final avg acc"][1] == pytest.approx(np.std(finals, ddof=1))
    forgetting = [metrics.forgetting(m) for m in MATRICES]
    assert row["forgetting"][1] == pytest.approx(np.std(forgetting, ddof=1))
    assert row["s/task"] == (pytest.approx(2.0), pytest.approx(0.0))
    assert row["FWT"] == (None, None) and row["seeds"] == [0, 1, 2]
    table = report.markdown_table([row])
    assert "FWT" not in table and "task identity" not in table  # columns nobody defines
    assert f"{np.mean(finals):.2f} +- {np.std(finals, ddof=1):.2f}" in table
    assert "| 1,234 |" in table  # a count that never varies shows no +- 0
    parsed = list(csv.DictReader(io.StringIO(report.csv_table([row]))))
    assert float(parsed[0]["final avg acc mean"]) == pytest.approx(np.mean(finals))
    assert parsed[0]["FWT mean"] == "" and parsed[0]["seeds"] == "0 1 2"
    assert report.mean_std([3.0]) == (3.0, None) and report.mean_std([None]) == (None, None)


def _png_with_content(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), np.float64)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels.std() > 10  # not a blank canvas


def test_the_report_writes_tables_and_plots(tmp_path):
    workdirs = []
    for seed, m in enumerate(MATRICES):
        workdir = tmp_path / f"run{seed}"
        os.makedirs(workdir)
        (workdir / "results.json").write_text(json.dumps(fake_run(m, seed)))
        workdirs.append(str(workdir))
    assert report.main([*workdirs, "--out", str(tmp_path / "out")]) == 0
    for name in ("accuracy_curves.png", "forgetting.png"):
        _png_with_content(tmp_path / "out" / name)
    assert (tmp_path / "out" / "table.md").read_text().startswith("| setting | runs |")
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path)]) == 1


def test_per_task_forgetting_and_the_matrix_figure(tmp_path):
    for m in MATRICES:
        per_task = plots.task_forgetting(m)
        assert per_task.mean() == pytest.approx(metrics.forgetting(m))
    np.testing.assert_allclose(plots.task_forgetting(MATRICES[0]), [30.0, 30.0])
    path = plots.plot_accuracy_matrices(fake_run(MATRICES[0], 0), str(tmp_path / "m.png"))
    _png_with_content(path)


def test_a_figure_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash while a figure is being drawn to disk leaves the previous file (and no
    temporary file) behind."""
    from matplotlib.figure import Figure
    path = plots.plot_accuracy_matrices(fake_run(MATRICES[0], 0), str(tmp_path / "m.png"))
    before = open(path, "rb").read()

    def dies_midway(self, f, **kwargs):
        f.write(b"\x89PNG partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(Figure, "savefig", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_accuracy_matrices(fake_run(MATRICES[1], 1), path)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["m.png"]


def test_files_written_whole_keep_the_usual_modes(tmp_path):
    """A new file gets what open() would give it under the process's umask (mkstemp's
    temporary file is owner-only: a shared workdir's readers must still read results and
    figures); a replaced file keeps its mode."""
    from pecft_jax import files
    mask = os.umask(0)
    os.umask(mask)
    assert files._NEW_FILE_MODE == 0o666 & ~mask
    files.write_text_atomic(str(tmp_path / "new.json"), "{}")
    path = plots.plot_accuracy_matrices(fake_run(MATRICES[0], 0), str(tmp_path / "m.png"))
    with open(tmp_path / "plain.txt", "w") as f:  # what open() gives
        f.write("x")
    plain = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert os.stat(tmp_path / "new.json").st_mode & 0o777 == plain
    assert os.stat(path).st_mode & 0o777 == plain
    os.chmod(tmp_path / "new.json", 0o640)
    files.write_text_atomic(str(tmp_path / "new.json"), "[]")
    assert os.stat(tmp_path / "new.json").st_mode & 0o777 == 0o640
    assert (tmp_path / "new.json").read_text() == "[]"


def test_the_verdict_places_a_demo_run_between_its_bounds(tmp_path):
    bounds = {"split_mnist": {"num_tasks": 3, "class_order": list(range(6)), "seeds": [0, 1, 2],
                              "finetune": {"mean": 20.0, "std": 1.0},
                              "joint": {"mean": 80.0, "std": 2.0}}}
    path = tmp_path / "bounds.json"
    path.write_text(json.dumps(bounds))
    run = fake_run(MATRICES[0], 0)  # final average accuracy (60 + 50 + 85) / 3 = 65
    run["config"].update(benchmark="split_mnist", backbone={"checkpoint": "demo"})
    line = report.verdict_line(run, str(path))
    assert line.startswith("verdict: l2p reaches 65.00 on split_mnist")
    assert "(20.00 +- 1.00)" in line and "(80.00 +- 2.00; 3 seeds" in line
    assert "75% of the way" in line  # (65 - 20) / (80 - 20)
    other = json.loads(json.dumps(run))
    other["config"]["backbone"]["checkpoint"] = "random:ViT-Micro/4"  # not the bounds' setting
    assert report.verdict_line(other, str(path)) is None
    other = json.loads(json.dumps(run))
    other["class_order"] = list(reversed(range(6)))
    assert report.verdict_line(other, str(path)) is None
    assert report.verdict_line(dict(run, method="finetune"), str(path)) is None
    # an entry measured on another backbone (the text demo's) speaks for that one only
    bounds["split_mnist"]["backbone_checkpoint"] = "minilm"
    path.write_text(json.dumps(bounds))
    assert report.verdict_line(run, str(path)) is None
    run["config"]["backbone"]["checkpoint"] = "minilm"
    assert report.verdict_line(run, str(path)).startswith("verdict: l2p reaches 65.00")


def test_a_key_missing_from_an_older_run_counts_as_its_default():
    """A run written before a config key existed belongs with runs that have the key at its
    default value, and apart from runs that set it otherwise."""
    old, new, other = (fake_run(m, s) for s, m in enumerate(MATRICES))
    new["config"]["eval"] = {"future_tasks": False}  # the default
    other["config"]["eval"] = {"future_tasks": True}
    groups = report.group_runs([old, new, other])
    assert [len(members) for _, members in groups] == [2, 1]
    assert groups[1][0] == "l2p [eval.future_tasks=True]"


def test_the_shipped_bounds_are_those_of_their_benchmarks():
    """Each entry of demo_bounds.json is its benchmark's setting as the config files build
    it (backbone, tasks, class order), so the demos' verdict lines fire, and its mean and
    std are those of its runs."""
    from pecft_jax.data import build_scenario
    from helpers import load_experiment_config
    with open(report.BOUNDS_FILE) as f:
        table = json.load(f)
    benchmarks = [name for name in table if not name.startswith("_")]
    assert set(benchmarks) == {"split_mnist", "wordnet"}
    for name in benchmarks:
        entry, config = table[name], load_experiment_config("finetune", name)
        assert config.backbone.checkpoint == entry.get("backbone_checkpoint", "demo")
        scenario = build_scenario(config)
        assert len(scenario.tasks) == entry["num_tasks"]
        assert [int(c) for c in scenario.class_order] == entry["class_order"]
        for bound in ("finetune", "joint"):
            runs = entry[bound]["runs"]
            assert len(runs) == len(entry["seeds"]) == 3
            assert entry[bound]["mean"] == pytest.approx(np.mean(runs), abs=1e-4)
            assert entry[bound]["std"] == pytest.approx(np.std(runs, ddof=1), abs=1e-4)
