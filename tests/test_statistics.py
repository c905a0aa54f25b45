"""Class statistics, Gaussian sampling, k-means and classifier fitting vs numpy/scikit-learn."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pecft_jax.methods import statistics as S
from pecft_jax.methods.base import apply_linear_head, init_linear_head

from helpers import array_task_data


def blobs(centers, n, scale, seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + scale * rng.standard_normal((n, len(c))) for c in centers])
    y = np.repeat(np.arange(len(centers)), n)
    return x, y


def test_covariance_statistics_match_numpy():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((90, 5)) @ rng.standard_normal((5, 5)) + 3.0
    labels = rng.integers(0, 3, 90) + 2  # classes 2, 3, 4 of a 6-class scenario
    stats = S.empty_statistics(6, 5, "covariance")
    stats["mean"][0] = 7.0  # an earlier task's row must survive
    out = S.update_statistics(stats, feats, labels, [2, 3, 4])
    for c in (2, 3, 4):
        f = feats[labels == c]
        np.testing.assert_allclose(out["mean"][c], f.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["cov"][c], np.cov(f, rowvar=False), rtol=1e-4, atol=1e-5)
        assert out["count"][c] == len(f)
    assert np.all(out["mean"][0] == 7.0) and out["count"][5] == 0
    diag = S.update_statistics(S.empty_statistics(6, 5, "variance"), feats, labels, [2, 3, 4])
    for c in (2, 3, 4):
        np.testing.assert_allclose(diag["var"][c], np.var(feats[labels == c], 0, ddof=1),
                                   rtol=1e-4)
    with pytest.raises(ValueError, match="class 5 has no examples"):
        S.update_statistics(stats, feats, labels, [5])


def test_statistics_from_task_data_map_skips_padding():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((21, 4, 4, 1)).astype(np.float32)  # 21: last batch padded
    labels = np.arange(21) % 3
    w = rng.standard_normal((16, 6)).astype(np.float32)
    fn = lambda batch, w: batch["inputs"].reshape(batch["inputs"].shape[0], -1) @ w
    out = S.statistics_from_task(array_task_data(images, labels), fn, [0, 1, 2],
                                 S.empty_statistics(3, 6), w)
    feats = images.reshape(21, -1) @ w
    for c in range(3):
        np.testing.assert_allclose(out["mean"][c], feats[labels == c].mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["cov"][c], np.cov(feats[labels == c], rowvar=False),
                                   rtol=1e-4, atol=1e-4)
        assert out["count"][c] == 7


def test_sampling_reproduces_the_moments():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 3))
    cov = a @ a.T + 0.1 * np.eye(3)
    stats = S.empty_statistics(2, 3, "covariance")
    stats["mean"][1], stats["cov"][1], stats["count"][1] = [1.0, -2.0, 0.5], cov, 10
    comp = S.gaussian_components(stats, [1], ridge=1e-4)
    np.testing.assert_allclose(comp["scale"][0] @ comp["scale"][0].T, cov + 1e-4 * np.eye(3),
                               rtol=1e-5, atol=1e-5)
    x, y = jax.jit(lambda k: S.sample_components(k, comp, 200_000))(jax.random.key(0))
    x = np.asarray(x, np.float64)
    assert np.all(np.asarray(y) == 1)
    np.testing.assert_allclose(x.mean(0), [1.0, -2.0, 0.5], atol=0.02)
    np.testing.assert_allclose(np.cov(x, rowvar=False), cov + 1e-4 * np.eye(3), atol=0.03)
    # diagonal statistics
    diag = S.empty_statistics(1, 2, "variance")
    diag["mean"][0], diag["var"][0], diag["count"][0] = [3.0, 0.0], [4.0, 0.25], 5
    x, _ = S.sample_components(jax.random.key(1), S.gaussian_components(diag, [0], ridge=0.0),
                               200_000)
    np.testing.assert_allclose(np.asarray(x).mean(0), [3.0, 0.0], atol=0.02)
    np.testing.assert_allclose(np.asarray(x).var(0), [4.0, 0.25], rtol=0.02)
    with pytest.raises(ValueError, match="no statistics stored for classes \\[0\\]"):
        S.gaussian_components(stats, [0, 1])


def check_lloyd_fixed_point(x, centers, assign):
    d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(assign, d.argmin(1))  # nearest centre
    for j in range(len(centers)):
        np.testing.assert_allclose(centers[j], x[assign == j].mean(0), atol=1e-9)  # mean


def test_kmeans_matches_scikit_learn_on_blobs():
    from sklearn.cluster import KMeans
    x, truth = blobs([[0, 0], [10, 0], [0, 10], [10, 10], [5, 20]], 40, 1.0, seed=3)
    centers, assign, inertia = S.kmeans(x, 5, seed=0)
    check_lloyd_fixed_point(x, centers, assign)
    ref = KMeans(n_clusters=5, n_init=10, random_state=0).fit(x)
    # the same partition (up to cluster ids) and the same objective
    assert len(set(zip(assign.tolist(), ref.labels_.tolist()))) == 5
    assert len(set(zip(assign.tolist(), truth.tolist()))) == 5  # the true blobs
    np.testing.assert_allclose(inertia, ref.inertia_, rtol=1e-6)
    np.testing.assert_allclose(inertia, ((x - centers[assign]) ** 2).sum(), rtol=1e-9)
    # deterministic per seed
    again = S.kmeans(x, 5, seed=0)
    np.testing.assert_array_equal(again[0], centers)
    with pytest.raises(ValueError, match="1 <= k <= number of points"):
        S.kmeans(x[:3], 4)


def test_multi_centroid_statistics_find_the_subclusters():
    x, sub = blobs([[0, 0, 0], [8, 0, 0], [0, 8, 0]], 30, 0.5, seed=4)
    labels = np.zeros(len(x), int)  # one class made of three clusters
    out = S.update_statistics(S.empty_statistics(2, 3, "multi_centroid", n_centroids=3),
                              x, labels, [0], seed=0)
    assert sorted(out["count"][0].tolist()) == [30, 30, 30]
    found = sorted(map(tuple, np.round(out["mean"][0], 4)))
    expected = sorted(map(tuple, np.round([x[sub == j].mean(0) for j in range(3)], 4)))
    np.testing.assert_allclose(found, expected, atol=1e-3)
    true_means = np.array([x[sub == i].mean(0) for i in range(3)])
    for j in range(3):  # each cluster's variance is its sub-cluster's (biased, as np.var)
        i = np.argmin(((true_means - out["mean"][0, j]) ** 2).sum(1))
        np.testing.assert_allclose(out["var"][0, j], x[sub == i].var(0), rtol=1e-4)
    protos, valid = S.prototypes(out)
    assert protos.shape == (6, 3) and np.asarray(valid).tolist() == [True] * 3 + [False] * 3
    comp = S.gaussian_components(out, [0], ridge=0.0)
    assert comp["mean"].shape == (3, 3) and comp["scale"].shape == (3, 3)


def test_zero_variance_clusters_are_skipped_when_asked():
    """HiDe-Prompt's sampler skips a cluster whose variance is 0 on average (a single
    example): not valid, never drawn; by default it is drawn with the ridge alone."""
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.normal(size=(20, 3)), [[9.0, 9.0, 9.0]]])  # one lone outlier
    stats = S.update_statistics(S.empty_statistics(1, 3, "multi_centroid", n_centroids=2),
                                x, np.zeros(len(x), int), [0], seed=0)
    lone = int(np.argmin(stats["count"][0]))
    assert stats["count"][0, lone] == 1 and not np.asarray(stats["var"][0, lone]).any()
    kept = S.gaussian_components(stats, [0], every_class=True)
    skipped = S.gaussian_components(stats, [0], every_class=True, skip_zero_variance=True)
    assert kept["valid"].tolist() == [True, True]
    assert skipped["valid"].tolist() == [j != lone for j in range(2)]


@pytest.mark.parametrize("metric", ["l1", "l2", "sqeuclidean", "cosine"])
def test_centroid_distances_match_numpy(metric):
    rng = np.random.default_rng(5)
    x, c = rng.standard_normal((4, 6)), rng.standard_normal((3, 2, 6))
    diff = x[:, None, None, :] - c[None]
    expected = {"l1": np.abs(diff).sum(-1), "l2": np.sqrt((diff ** 2).sum(-1)),
                "sqeuclidean": (diff ** 2).sum(-1),
                "cosine": 1 - np.einsum("bd,tkd->btk", x, c)
                / np.linalg.norm(x, axis=-1)[:, None, None] / np.linalg.norm(c, axis=-1)[None]}
    got = S.centroid_distances(jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32), metric)
    np.testing.assert_allclose(got, expected[metric], rtol=1e-4, atol=1e-4)


def test_a_linear_head_learns_from_sampled_statistics():
    # four well separated classes known only through their mean and covariance
    means = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3]], float)
    stats = S.empty_statistics(5, 4, "covariance")
    for c in range(4):
        stats["mean"][c], stats["cov"][c], stats["count"][c] = means[c], 0.2 * np.eye(4), 50
    comp = S.gaussian_components(stats, range(4), every_class=True)
    assert comp["valid"].tolist() == [True] * 4 + [False]  # class 4: no statistics yet
    head = init_linear_head(jax.random.key(0), 4, 5)
    mask = np.array([True] * 4 + [False])
    fit = S.ClassifierFit(apply_linear_head, optax.trace(0.9), S.cosine_epoch_schedule(0.1, 10, 1),
                          epochs=10, batch_size=16, draw=S.sampled_features(32))
    head, losses = fit(head, jax.random.key(1), comp, steps_per_epoch=8, available=4 * 32,
                       class_mask=mask)
    assert losses.shape == (10,) and losses[-1] < 0.3 * losses[0]
    x, y = S.sample_components(jax.random.key(9), comp, 100)
    pred = np.argmax(np.asarray(apply_linear_head(head, x))[:, :4], -1)
    real = np.asarray(y) < 4
    assert np.mean(pred[real] == np.asarray(y)[real]) > 0.97
    with pytest.raises(ValueError, match="the draw has 128"):
        fit(head, jax.random.key(1), comp, steps_per_epoch=9, available=4 * 32)


def test_classifier_fit_is_sgd_with_momentum_over_the_valid_rows_compiled_once():
    """One epoch of ClassifierFit = a numpy re-computation of torch's SGD (momentum, coupled
    weight decay) over batches of the valid rows in the fit's order; padding never used; a
    second call with another number of steps and other data does not recompile."""
    rng = np.random.default_rng(0)
    n, d, c, batch = 12, 3, 4, 4
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, c, n).astype(np.int32)
    valid = np.arange(n) < 9  # 3 padding rows, full of garbage
    x[~valid] = 1e6
    params = {"kernel": rng.standard_normal((d, c)).astype(np.float32),
              "bias": np.zeros(c, np.float32)}
    lr, momentum, wd = 0.1, 0.9, 0.01
    direction = optax.chain(optax.add_decayed_weights(wd), optax.trace(momentum))
    fit = S.ClassifierFit(apply_linear_head, direction, lambda e: lr, epochs=1,
                          batch_size=batch, draw=S.given_features)
    traces = []
    fit._compiled = jax.jit(lambda *a: (traces.append(1), fit._fit(*a))[1])
    got, losses = fit(params, jax.random.key(3), (x, y, valid), steps_per_epoch=2, available=9)

    # the order the fit uses: its own key schedule, valid rows first
    k_draw, k_order = jax.random.split(jax.random.fold_in(jax.random.key(3), 0))
    order = np.argsort(np.where(valid, np.asarray(jax.random.uniform(k_order, (n,))), 2.0))
    assert set(order[:9]) == set(range(9))
    w, b = params["kernel"].astype(np.float64), params["bias"].astype(np.float64)
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    for i in range(2):
        rows = order[i * batch:(i + 1) * batch]
        logits = x[rows] @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(batch), y[rows]] -= 1.0
        g_w, g_b = x[rows].T @ p / batch + wd * w, p.mean(0) + wd * b
        buf_w, buf_b = momentum * buf_w + g_w, momentum * buf_b + g_b
        w, b = w - lr * buf_w, b - lr * buf_b
    np.testing.assert_allclose(got["kernel"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bias"], b, rtol=1e-4, atol=1e-5)
    assert np.isfinite(losses).all()
    fit(params, jax.random.key(4), (x + 1, y, valid), steps_per_epoch=1, available=9)
    assert len(traces) == 1


def numpy_sgd_epoch(w, b, buf_w, buf_b, x, y, order, steps, batch, lr, momentum,
                    available=None):
    """Steps of torch's SGD with momentum over ``order``'s batches, in float64; batches end
    at the first ``available`` rows of ``order`` (a partial last batch: its mean)."""
    end = len(order) if available is None else available
    for i in range(steps):
        rows = order[i * batch:min((i + 1) * batch, end)]
        logits = x[rows] @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(rows)), y[rows]] -= 1.0
        buf_w = momentum * buf_w + x[rows].T @ p / len(rows)
        buf_b = momentum * buf_b + p.mean(0)
        w, b = w - lr * buf_w, b - lr * buf_b
    return w, b, buf_w, buf_b


def test_classifier_fit_by_epoch_carries_the_state_into_each_epochs_own_data():
    """Two epochs on different features (two augmentations of the same images), one call
    each, = numpy's SGD with momentum over both in the fit's orders: the momentum carries
    from epoch 0 into epoch 1, and each epoch reads its own data. With the same data every
    epoch, ``by_epoch`` gives the one-call fit's parameters and losses bit for bit. One
    compilation serves all of it."""
    rng = np.random.default_rng(1)
    n, d, c, batch, lr, momentum = 8, 3, 4, 4, 0.1, 0.9
    xs = [rng.standard_normal((n, d)).astype(np.float32) for _ in range(2)]
    y = rng.integers(0, c, n).astype(np.int32)
    valid = np.ones(n, bool)
    params = {"kernel": rng.standard_normal((d, c)).astype(np.float32),
              "bias": np.zeros(c, np.float32)}
    fit = S.ClassifierFit(apply_linear_head, optax.trace(momentum), lambda e: lr, epochs=2,
                          batch_size=batch, draw=S.given_features)
    traces, calls = [], []
    fit._compiled = jax.jit(lambda *a: (traces.append(1), fit._fit(*a))[1])
    key = jax.random.key(7)
    got, losses = fit.by_epoch(params, key, lambda e: (calls.append(e), (xs[e], y, valid))[1],
                               steps_per_epoch=2, available=n)
    assert calls == [0, 1]
    w, b = params["kernel"].astype(np.float64), params["bias"].astype(np.float64)
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    for e in range(2):
        _, k_order = jax.random.split(jax.random.fold_in(key, e))
        order = np.argsort(np.asarray(jax.random.uniform(k_order, (n,))))
        w, b, buf_w, buf_b = numpy_sgd_epoch(w, b, buf_w, buf_b, xs[e].astype(np.float64), y,
                                             order, 2, batch, lr, momentum)
    np.testing.assert_allclose(got["kernel"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bias"], b, rtol=1e-4, atol=1e-5)
    assert losses.shape == (2,) and np.isfinite(losses).all()

    same, same_losses = fit.by_epoch(params, key, lambda e: (xs[0], y, valid),
                                     steps_per_epoch=2, available=n)
    one, one_losses = fit(params, key, (xs[0], y, valid), steps_per_epoch=2, available=n)
    for leaf in ("kernel", "bias"):
        np.testing.assert_array_equal(same[leaf], one[leaf])
    np.testing.assert_array_equal(same_losses, one_losses)
    assert not np.allclose(same["kernel"], got["kernel"], atol=1e-4)  # epoch 1's data counted
    assert len(traces) == 1


def test_classifier_fit_keeping_the_last_partial_batch_takes_its_mean_over_its_rows():
    """``drop_last=False``: 10 valid rows in batches of 4 are 3 steps (4, 4, 2), the last
    one's gradient the mean over its 2 rows (torch's loader and CrossEntropyLoss), the
    padding rows (garbage) never read; as numpy's SGD with momentum over two epochs."""
    rng = np.random.default_rng(2)
    n, d, c, batch, lr, momentum, available = 12, 3, 4, 4, 0.1, 0.9, 10
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, c, n).astype(np.int32)
    valid = np.arange(n) < available
    x[~valid] = 1e6
    params = {"kernel": rng.standard_normal((d, c)).astype(np.float32),
              "bias": np.zeros(c, np.float32)}
    fit = S.ClassifierFit(apply_linear_head, optax.trace(momentum), lambda e: lr, epochs=2,
                          batch_size=batch, draw=S.given_features, drop_last=False)
    assert fit.steps_per_epoch(available) == 3
    assert S.ClassifierFit(apply_linear_head, optax.trace(momentum), lambda e: lr, epochs=2,
                           batch_size=batch, draw=S.given_features).steps_per_epoch(10) == 2
    key = jax.random.key(5)
    got, losses = fit(params, key, (x, y, valid), steps_per_epoch=3, available=available)
    w, b = params["kernel"].astype(np.float64), params["bias"].astype(np.float64)
    buf_w, buf_b = np.zeros_like(w), np.zeros_like(b)
    for e in range(2):
        _, k_order = jax.random.split(jax.random.fold_in(key, e))
        order = np.argsort(np.where(valid, np.asarray(jax.random.uniform(k_order, (n,))), 2.0))
        w, b, buf_w, buf_b = numpy_sgd_epoch(w, b, buf_w, buf_b, x.astype(np.float64), y,
                                             order, 3, batch, lr, momentum, available)
    np.testing.assert_allclose(got["kernel"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bias"], b, rtol=1e-4, atol=1e-5)
    assert np.isfinite(losses).all()
    with pytest.raises(ValueError, match="4 steps of 4 need 13 features"):
        fit(params, key, (x, y, valid), steps_per_epoch=4, available=available)


def test_cosine_epoch_schedule_is_torch_cosine_annealing():
    sched = S.cosine_epoch_schedule(0.5, 4, 3)
    got = [float(sched(i)) for i in range(12)]
    expected = [0.5 * 0.5 * (1 + np.cos(np.pi * (i // 3) / 4)) for i in range(12)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
