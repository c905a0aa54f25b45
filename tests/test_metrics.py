"""Continual-learning metrics on small hand-computed accuracy matrices."""
import numpy as np
import pytest

from pecft_jax import metrics

# Lower-triangular, ragged rows. Task 0 peaks after task 1 (70 > 50), so forgetting
# (best earlier minus final) and BWT (final minus just-learned) disagree in sign.
RAGGED = [[50.0], [70.0, 80.0], [60.0, 75.0, 90.0]]


def test_hand_computed_three_tasks():
    assert metrics.average_accuracy(RAGGED) == pytest.approx((60 + 75 + 90) / 3)
    # A_0 = 50, A_1 = 75, A_2 = 75
    assert metrics.average_incremental_accuracy(RAGGED) == pytest.approx((50 + 75 + 75) / 3)
    # task 0: max(50, 70) - 60 = 10; task 1: 80 - 75 = 5
    assert metrics.forgetting(RAGGED) == pytest.approx(7.5)
    # task 0: 60 - 50 = 10; task 1: 75 - 80 = -5
    assert metrics.backward_transfer(RAGGED) == pytest.approx(2.5)


def test_nonnegative_forgetting_is_the_l2p_and_hide_prompt_codes_formula():
    """Task 0 ends better than ever (60 > 50, 40): standard forgetting counts -10 for it,
    the official codes' max over every evaluation (the last included) 0."""
    R = [[50.0], [40.0, 80.0], [60.0, 75.0, 90.0]]
    # the official line on its (task, after task) matrix, zeros where not evaluated yet
    acc_matrix = np.zeros((3, 3))
    for t, row in enumerate(R):
        acc_matrix[:len(row), t] = row
    official = np.mean((np.max(acc_matrix, axis=1) - acc_matrix[:, 2])[:2])
    assert metrics.nonnegative_forgetting(R) == pytest.approx(official) == pytest.approx(2.5)
    assert metrics.forgetting(R) == pytest.approx((-10 + 5) / 2)
    assert metrics.nonnegative_forgetting(RAGGED) == metrics.forgetting(RAGGED)  # no gains
    assert metrics.summarize(R)["nonnegative_forgetting"] == pytest.approx(2.5)


def test_square_array_with_nan_upper_triangle_equals_ragged_rows():
    square = np.array([[90.0, np.nan, np.nan], [80.0, 70.0, np.nan], [60.0, 65.0, 85.0]])
    ragged = [[90.0], [80.0, 70.0], [60.0, 65.0, 85.0]]
    assert metrics.summarize(square) == metrics.summarize(ragged)
    out = metrics.summarize(ragged)
    assert out["average_accuracy"] == pytest.approx(70.0)
    assert out["average_incremental_accuracy"] == pytest.approx((90 + 75 + 70) / 3)
    assert out["forgetting"] == pytest.approx((30 + 5) / 2)
    assert out["bwt"] == pytest.approx((-30 - 5) / 2)
    assert "fwt" not in out


def test_forward_transfer_uses_first_superdiagonal():
    full = [[90.0, 12.0, 8.0], [80.0, 70.0, 15.0], [60.0, 65.0, 85.0]]
    reference = [10.0, 10.0, 11.0]
    # (R[0][1] - b_1 + R[1][2] - b_2) / 2 = (2 + 4) / 2
    assert metrics.forward_transfer(full, reference) == pytest.approx(3.0)
    assert metrics.summarize(full, reference)["fwt"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"R\[j-1\]\[j\]"):
        metrics.forward_transfer(RAGGED, reference)
    with pytest.raises(ValueError, match="one accuracy per task"):
        metrics.forward_transfer(full, [10.0, 10.0])


def test_single_task():
    out = metrics.summarize([[88.0]], reference=[5.0])
    assert out == {"average_accuracy": 88.0, "average_incremental_accuracy": 88.0,
                   "forgetting": 0.0, "nonnegative_forgetting": 0.0, "bwt": 0.0, "fwt": 0.0}


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    (np.zeros((0, 0)), "empty"),
    (np.ones((2, 3)), "square"),
    (np.ones(3), "2-D"),
    ([[1.0, 2.0], [3.0]], "row 1 has 1 entries"),
    ([[1.0, 2.0, 3.0], [1.0, 2.0]], "only 2 rows"),
    ([[1.0], [np.nan, 2.0]], r"R\[1\]\[0\]"),
])
def test_malformed_matrices_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        metrics.average_accuracy(bad)


def test_class_incremental_accuracy_ignores_unseen_classes():
    # 4 samples, 6 logits; classes 4 and 5 are not seen yet and have the largest logits.
    logits = np.array([[5.0, 1.0, 0.0, 0.0, 9.0, 0.0],
                       [0.0, 2.0, 3.0, 0.0, 0.0, 9.0],
                       [0.0, 0.0, 0.0, 1.0, 9.0, 9.0],
                       [1.0, 0.0, 0.0, 0.0, 9.0, 0.0]])
    labels = np.array([0, 2, 3, 1])
    # predictions among classes 0..3: 0, 2, 3, 0 -> 3 of 4 right
    assert metrics.class_incremental_accuracy(logits, labels, 4) == pytest.approx(75.0)
    assert metrics.class_incremental_accuracy(logits, labels, [3, 2, 1, 0]) == pytest.approx(75.0)
    # with all 6 classes seen, the large logits of classes 4/5 win everywhere
    assert metrics.class_incremental_accuracy(logits, labels, 6) == 0.0
    with pytest.raises(ValueError, match="not among the seen classes"):
        metrics.class_incremental_accuracy(logits, np.array([0, 2, 5, 1]), 4)


def test_task_incremental_accuracy_restricts_to_task_classes():
    logits = np.array([[9.0, 0.0, 1.0, 2.0],
                       [9.0, 0.0, 3.0, 2.0],
                       [9.0, 0.0, 0.0, 2.0]])
    labels = np.array([3, 3, 2])
    # task {2, 3}: predictions 3, 2, 3 -> 1 of 3 right
    assert metrics.task_incremental_accuracy(logits, labels, [2, 3]) == pytest.approx(100 / 3)
    # class-incremental over all 4 classes would get none right
    assert metrics.class_incremental_accuracy(logits, labels, 4) == 0.0
    with pytest.raises(ValueError, match="not classes of this task"):
        metrics.task_incremental_accuracy(logits, np.array([3, 0, 2]), [2, 3])


def test_empty_task_and_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="no samples"):
        metrics.class_incremental_accuracy(np.zeros((0, 3)), np.zeros((0,), int), 3)
    with pytest.raises(ValueError, match="labels must be"):
        metrics.task_incremental_accuracy(np.zeros((2, 3)), np.zeros((3,), int), [0])
    with pytest.raises(ValueError, match="task_classes is empty"):
        metrics.task_incremental_accuracy(np.zeros((2, 3)), np.zeros((2,), int), [])
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        metrics.class_incremental_accuracy(np.zeros((2, 3)), np.zeros((2,), int), 5)


def test_the_printed_report_names_the_class_order():
    from pecft_jax.report import format_results
    results = {"method": "m", "dataset": "d", "num_tasks": 2, "trainable_params": 1,
               "class_order": list(range(30))[::-1], "accuracy_matrix": [[50.0]],
               "task_il_accuracy_matrix": [[50.0]], "metrics": {"average_accuracy": 50.0}}
    text = format_results(results)
    assert "class order: [29, 28, 27," in text and "... (30 classes)]" in text


def test_pooled_accuracy_weights_tasks_by_test_size():
    R = [[90.0], [80.0, 60.0]]
    # 100 test examples of task 0 at 80%, 300 of task 1 at 60%: 80 + 180 right of 400
    assert metrics.pooled_accuracy(R, [100, 300]) == pytest.approx(65.0)
    assert metrics.pooled_accuracy(R, [5, 5]) == pytest.approx(metrics.average_accuracy(R))
    assert metrics.summarize(R, test_sizes=[100, 300])["pooled_accuracy"] == pytest.approx(65.0)
    with pytest.raises(ValueError, match="one positive count per task"):
        metrics.pooled_accuracy(R, [100])


def test_pooled_incremental_accuracy_averages_the_pooled_curve():
    """PyCIL's "average accuracy": the mean over steps of the accuracy over every seen test
    example. By hand: step 0 pools task 0 alone (90), step 1 pools 80 + 180 right of 400."""
    R = [[90.0], [80.0, 60.0]]
    assert metrics.pooled_incremental_accuracy(R, [100, 300]) == pytest.approx((90 + 65) / 2)
    R3 = [[50.0], [40.0, 70.0], [30.0, 60.0, 90.0]]
    sizes = [10, 20, 70]
    by_hand = (50.0 + (400 + 1400) / 30 + (300 + 1200 + 6300) / 100) / 3
    assert metrics.pooled_incremental_accuracy(R3, sizes) == pytest.approx(by_hand)
    assert metrics.pooled_incremental_accuracy(R3, [7, 7, 7]) == pytest.approx(
        metrics.average_incremental_accuracy(R3))
    assert metrics.summarize(R3, test_sizes=sizes)["pooled_incremental_accuracy"] == \
        pytest.approx(by_hand)
    with pytest.raises(ValueError, match="one positive count per task"):
        metrics.pooled_incremental_accuracy(R3, [1, 0, 1])


def test_top_k_old_new_and_confusion_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 12))
    labels = rng.integers(0, 8, size=200)
    seen = list(range(8))
    ranked = np.argsort(-logits[:, :8], axis=1)
    for k in (1, 3, 5):
        expected = 100 * np.mean([labels[i] in ranked[i, :k] for i in range(200)])
        assert metrics.top_k_accuracy(logits, labels, seen, k) == pytest.approx(expected)
    assert metrics.top_k_accuracy(logits, labels, seen, 1) == pytest.approx(
        metrics.class_incremental_accuracy(logits, labels, seen))
    assert metrics.top_k_accuracy(logits, labels, seen, 50) == 100.0  # k capped at 8
    predictions = metrics.class_il_predictions(logits, seen)
    np.testing.assert_array_equal(predictions, np.argmax(logits[:, :8], axis=1))
    confusion = metrics.confusion_matrix(labels, predictions, seen)
    for true in range(8):
        for pred in range(8):
            assert confusion[true, pred] == np.sum((labels == true) & (predictions == pred))
    old = metrics.subset_accuracy(labels, predictions, range(6))
    new = metrics.subset_accuracy(labels, predictions, [6, 7])
    n_old, n_new = np.sum(labels < 6), np.sum(labels >= 6)
    assert (old * n_old + new * n_new) / 200 == pytest.approx(100 * np.mean(predictions == labels))
    assert metrics.subset_accuracy(labels, predictions, [11]) is None
