"""``eval.class_il_classes``: the class-IL argmax over the classes seen so far (the usual
protocol) or over every class of the run (the official L2P / DualPrompt / HiDe-Prompt
evaluations), through the loop's evaluation with logits chosen by the test."""
import numpy as np
import pytest

from pecft_jax.configs import check_run_config
from pecft_jax.train.loop import ContinualTrainer, config_hash

from helpers import tiny_config


def _evaluate_with_logits(tmp_path, scope, t, seen_logit):
    """Evaluation after task ``t`` of a tiny run whose every example gets the logits
    ``seen_logit - 0.01 c`` for the seen classes ``c`` and 0 for the others."""
    config = tiny_config()
    config.eval.class_il_classes = scope
    trainer = ContinualTrainer(config, str(tmp_path / scope))
    try:
        run, _ = trainer.restore_or_init()
        seen = sorted({c for task in trainer.scenario.tasks[:t + 1] for c in task.classes})
        row = np.zeros(trainer.scenario.num_classes, np.float32)
        row[seen] = seen_logit - 0.01 * np.asarray(seen, np.float32)

        def eval_step(trainable, state, frozen, inputs, task):
            return {"logits": np.broadcast_to(row, (inputs["mask"].shape[0], row.size))}
        trainer.compiled_eval_step = lambda spec: eval_step
        return trainer.evaluate(run, t, predictions=True), seen, trainer.scenario
    finally:
        trainer.close()


def test_an_example_whose_seen_logits_are_all_negative_counts_wrong_over_every_class(tmp_path):
    seen_row, seen, scenario = _evaluate_with_logits(tmp_path, "seen", 0, -1.0)
    all_row, _, _ = _evaluate_with_logits(tmp_path, "all", 0, -1.0)
    first = min(seen)  # the largest seen logit: the lowest seen id
    labels = np.asarray(seen_row["predictions"]["label"])
    original_first = scenario.class_order[first]
    assert seen_row["class_il"][0] == pytest.approx(100 * np.mean(labels == original_first))
    assert 0 < seen_row["class_il"][0] < 100
    assert np.all(seen_row["predictions"]["prediction"] == original_first)
    # over every class the unlearnt ones' zero logits win: every prediction is wrong
    assert all_row["class_il"][0] == 0.0 and all_row["class_il_top5"][0] == 0.0
    unseen = set(scenario.class_order) - {scenario.class_order[c] for c in seen}
    assert set(np.asarray(all_row["predictions"]["prediction"]).tolist()) <= unseen
    assert len(all_row["confusion"]["classes"]) == scenario.num_classes
    assert len(seen_row["confusion"]["classes"]) == len(seen)
    assert all_row["task_il"] == seen_row["task_il"]  # task-IL knows the task either way


def test_positive_seen_logits_or_every_class_seen_give_the_same_row(tmp_path):
    seen_row, _, _ = _evaluate_with_logits(tmp_path / "a", "seen", 0, 1.0)
    all_row, _, _ = _evaluate_with_logits(tmp_path / "a", "all", 0, 1.0)
    assert all_row["class_il"] == seen_row["class_il"]
    last = tiny_config().scenario.num_tasks - 1  # every class seen
    seen_row, _, _ = _evaluate_with_logits(tmp_path / "b", "seen", last, -1.0)
    all_row, _, _ = _evaluate_with_logits(tmp_path / "b", "all", last, -1.0)
    assert all_row["class_il"] == seen_row["class_il"]
    assert all_row["confusion"] == seen_row["confusion"]


def test_the_setting_is_checked_and_hashed_only_when_set():
    config = tiny_config()
    older = tiny_config()
    del older.eval["class_il_classes"]
    assert config_hash(config) == config_hash(older)  # runs from before the key resume
    config.eval.class_il_classes = "all"
    assert config_hash(config) != config_hash(older)
    config.eval.class_il_classes = "unseen"
    with pytest.raises(ValueError, match="eval.class_il_classes must be 'seen'"):
        check_run_config(config)


@pytest.mark.parametrize("name,arg", [("l2p", "cifar100"), ("dualprompt", "imagenet_r"),
                                      ("hide_prompt", "cifar100"), ("l2p", "split_mnist")])
def test_the_official_configs_of_the_jax_and_hide_codes_evaluate_over_every_class(name, arg):
    from helpers import load_experiment_config
    config = load_experiment_config(name, arg)
    assert config.eval.class_il_classes == ("seen" if arg == "split_mnist" else "all")
