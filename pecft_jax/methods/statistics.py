"""Class statistics that replace stored exemplars: per-class Gaussians, sampling, k-means.

Methods that keep no raw data keep *statistics* of representations instead:

* HiDe-Prompt (Wang et al., NeurIPS 2023) stores the mean and covariance of every class's
  features -- of the frozen model (for task-identity inference) and of the prompted model
  (for task-adaptive prediction) -- and later trains classifiers on features *sampled* from
  those Gaussians. Its official code also offers a cheaper 'variance' (diagonal) form and a
  'multi_centroid' form (k-means inside each class, a diagonal Gaussian per cluster).
* S-Prompts (Wang et al., NeurIPS 2022) keeps k-means centroids of each domain's frozen
  features and picks the domain of a test image by its nearest centroid.

Everything the methods store lives in fixed-shape arrays over *all* classes of the scenario
(unseen classes have count 0), so a method's state keeps one shape for the whole run.

Host-side pieces (statistics, k-means) use numpy in float64; sampling and the centroid
distances are jax functions usable inside ``jit``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pecft_jax import compiler

Array = jax.Array
MODES = ("covariance", "variance", "multi_centroid")
METRICS = ("l2", "l1", "sqeuclidean", "cosine")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"statistics mode must be one of {MODES}, got {mode!r}")


# ----------------------------------------------------------------------------- k-means
def _kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): the first centre uniformly, each
    next one with probability proportional to the squared distance to the nearest centre."""
    n = x.shape[0]
    centers = np.empty((k, x.shape[1]), x.dtype)
    centers[0] = x[rng.integers(n)]
    closest = np.sum((x - centers[0]) ** 2, axis=1)
    for i in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than k: repeat one (its cluster stays empty)
            centers[i] = x[rng.integers(n)]
        else:
            centers[i] = x[rng.choice(n, p=closest / total)]
        closest = np.minimum(closest, np.sum((x - centers[i]) ** 2, axis=1))
    return centers


def _squared_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    d = (np.sum(x ** 2, axis=1)[:, None] - 2.0 * x @ centers.T
         + np.sum(centers ** 2, axis=1)[None, :])
    return np.maximum(d, 0.0)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-4) -> Tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ seeding; the best of ``n_init`` restarts.

    Args:
      x: ``(N, D)`` points.
      k: number of clusters (``1 <= k <= N``).
      seed: seed of the restarts (``np.random.default_rng``), so results are reproducible.
      n_init: restarts; the one with the lowest inertia is returned.
      max_iter: Lloyd iterations per restart.
      tol: stop when the summed squared centre shift is below ``tol`` times the mean
        per-feature variance of ``x`` (scikit-learn's criterion).

    Returns:
      ``(centers (k, D), assignment (N,) int, inertia)`` where ``inertia`` is the summed
      squared distance of each point to its centre. At convergence every centre is the mean
      of its points and every point is assigned to its nearest centre.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects (N, D) points, got shape {x.shape}")
    n = x.shape[0]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= number of points ({n}), got k={k!r}")
    threshold = tol * float(np.mean(np.var(x, axis=0)))
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(1, int(n_init))):
        centers = _kmeans_plus_plus(x, int(k), rng)
        for _ in range(max_iter):
            assign = np.argmin(_squared_distances(x, centers), axis=1)
            new = centers.copy()
            counts = np.bincount(assign, minlength=k)
            sums = np.zeros_like(centers)
            np.add.at(sums, assign, x)
            filled = counts > 0
            new[filled] = sums[filled] / counts[filled, None]
            if not filled.all():
                # An empty cluster takes the point farthest from its current centre.
                far = np.argsort(-np.sum((x - new[assign]) ** 2, axis=1))
                for slot, point in zip(np.flatnonzero(~filled), far):
                    new[slot] = x[point]
            shift = float(np.sum((new - centers) ** 2))
            centers = new
            if shift <= threshold:
                break
        d = _squared_distances(x, centers)
        assign = np.argmin(d, axis=1)
        inertia = float(np.sum(d[np.arange(n), assign]))
        if best is None or inertia < best[2]:
            best = (centers, assign, inertia)
    return best


def centroid_distances(x: Array, centroids: Array, metric: str = "l2") -> Array:
    """Distances ``(B, ..., K)`` from points ``(B, D)`` to centroids ``(..., K, D)``.

    ``'l2'`` Euclidean, ``'sqeuclidean'``, ``'l1'`` Manhattan (what the official S-Prompts
    code computes: ``sum(sqrt((f - c)**2))``), ``'cosine'`` (1 - cosine similarity).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if x.ndim != 2 or centroids.shape[-1] != x.shape[-1]:
        raise ValueError(f"centroid_distances expects points (B, D) and centroids (..., K, D), "
                         f"got {tuple(x.shape)} and {tuple(centroids.shape)}")
    lead = centroids.shape[:-1]
    flat = centroids.reshape(-1, centroids.shape[-1])
    if metric == "l1":
        d = jnp.sum(jnp.abs(x[:, None, :] - flat[None, :, :]), axis=-1)
    elif metric == "cosine":
        xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        cn = flat / jnp.maximum(jnp.linalg.norm(flat, axis=-1, keepdims=True), 1e-12)
        d = 1.0 - xn @ cn.T
    else:
        sq = (jnp.sum(x ** 2, -1)[:, None] - 2.0 * x @ flat.T + jnp.sum(flat ** 2, -1)[None, :])
        sq = jnp.maximum(sq, 0.0)
        d = sq if metric == "sqeuclidean" else jnp.sqrt(sq)
    return d.reshape((x.shape[0],) + lead)


# ------------------------------------------------------------------ class statistics
def statistics_shapes(num_classes: int, dim: int, mode: str = "covariance",
                      n_centroids: int = 10) -> dict:
    """Shapes of the fixed-size storage for per-class statistics over ``num_classes``:

    * ``'covariance'``: ``mean (C, D)``, ``cov (C, D, D)``, ``count (C,)``;
    * ``'variance'``: ``mean (C, D)``, ``var (C, D)``, ``count (C,)``;
    * ``'multi_centroid'``: ``mean (C, K, D)``, ``var (C, K, D)``, ``count (C, K)``.
    """
    _check_mode(mode)
    if mode == "covariance":
        return {"mean": (num_classes, dim), "cov": (num_classes, dim, dim),
                "count": (num_classes,)}
    if mode == "variance":
        return {"mean": (num_classes, dim), "var": (num_classes, dim), "count": (num_classes,)}
    return {"mean": (num_classes, n_centroids, dim), "var": (num_classes, n_centroids, dim),
            "count": (num_classes, n_centroids)}


def empty_statistics(num_classes: int, dim: int, mode: str = "covariance",
                     n_centroids: int = 10) -> dict:
    """Zero-filled (float32 numpy) statistics of :func:`statistics_shapes`; unseen classes
    have count 0."""
    return {k: np.zeros(shape, np.float32)
            for k, shape in statistics_shapes(num_classes, dim, mode, n_centroids).items()}


def statistics_mode(stats: Mapping[str, Any]) -> str:
    """Which of :data:`MODES` a statistics dict holds (from its keys and shapes)."""
    if "cov" in stats:
        return "covariance"
    if np.ndim(stats["count"]) == 2:
        return "multi_centroid"
    return "variance"


def update_statistics(stats: Mapping[str, Any], features: np.ndarray, labels: np.ndarray,
                      classes: Sequence[int], *, seed: int = 0) -> dict:
    """Return ``stats`` with the rows of ``classes`` (re)computed from ``features``.

    Per class ``c`` with examples ``F_c`` (``n_c x D``):

    * ``'covariance'``: mean and the unbiased covariance ``(F-mu)^T (F-mu) / (n_c - 1)``
      (``torch.cov``'s default, what the official HiDe-Prompt code stores);
    * ``'variance'``: mean and the diagonal of that covariance;
    * ``'multi_centroid'``: k-means (``K`` = the stored number of centroids, fewer if the
      class has fewer examples) inside the class; per cluster its mean, its (biased,
      ``np.var``) per-feature variance and its size.

    Classes without examples in ``features`` raise (a statistics pass should see every
    class of its task). Other rows are copied unchanged.
    """
    mode = statistics_mode(stats)
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2 or features.shape[0] != labels.shape[0]:
        raise ValueError(f"features must be (N, D) with one label each, got {features.shape} "
                         f"and {labels.shape} labels")
    dim = stats["mean"].shape[-1]
    if features.shape[1] != dim:
        raise ValueError(f"features have width {features.shape[1]}, the statistics {dim}")
    out = {k: np.array(v, np.float32, copy=True) for k, v in stats.items()}
    for c in classes:
        f = features[labels == c]
        n = f.shape[0]
        if n == 0:
            raise ValueError(f"class {c} has no examples in this statistics pass; every class "
                             f"of the task needs training data")
        if mode in ("covariance", "variance"):
            mu = f.mean(axis=0)
            centred = f - mu
            cov = centred.T @ centred / (n - 1) if n > 1 else np.zeros((dim, dim))
            out["mean"][c] = mu
            out["count"][c] = n
            if mode == "covariance":
                out["cov"][c] = cov
            else:
                out["var"][c] = np.diag(cov)
        else:
            k_max = out["count"].shape[1]
            k = min(k_max, n)
            _, assign, _ = kmeans(f, k, seed=seed + int(c))
            out["mean"][c] = 0.0
            out["var"][c] = 0.0
            out["count"][c] = 0.0
            for j in range(k):
                members = f[assign == j]
                if len(members):
                    out["mean"][c, j] = members.mean(axis=0)
                    out["var"][c, j] = members.var(axis=0)
                    out["count"][c, j] = len(members)
    return out


def statistics_from_task(data, feature_fn: Callable, classes: Sequence[int],
                         stats: Mapping[str, Any], *args, seed: int = 0) -> dict:
    """One pass of ``feature_fn(batch, *args)`` over a finished task's training data
    (:meth:`pecft_jax.methods.base.TaskData.map`), then :func:`update_statistics`."""
    features, labels = data.map(feature_fn, *args)
    return update_statistics(stats, features, labels, classes, seed=seed)


def prototypes(stats: Mapping[str, Any]) -> Tuple[Array, Array]:
    """Stored means as ``(P, D)`` prototypes and a ``(P,)`` validity mask (count > 0);
    ``P = C`` or ``C * K`` for multi-centroid statistics. jit-compatible."""
    mean = jnp.asarray(stats["mean"])
    count = jnp.asarray(stats["count"])
    return mean.reshape(-1, mean.shape[-1]), count.reshape(-1) > 0


# ------------------------------------------------------------------------- sampling
def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    """A factor ``L`` with ``L L^T = cov`` (Cholesky; eigen-decomposition if that fails)."""
    try:
        return np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(cov)
        return v * np.sqrt(np.clip(w, 0.0, None))[None, :]


def gaussian_components(stats: Mapping[str, Any], classes: Sequence[int], *,
                        ridge: float = 1e-4, every_class: bool = False,
                        skip_zero_variance: bool = False) -> dict:
    """The Gaussians to sample for ``classes``: ``{'mean': (G, D), 'scale': ..., 'label': (G,),
    'valid': (G,)}``.

    ``scale`` is a ``(G, D, D)`` factor ``L`` with ``L L^T = cov + ridge * I`` for
    covariance statistics, or a ``(G, D)`` standard deviation ``sqrt(var + ridge)`` for
    diagonal ones. The official HiDe-Prompt code adds ``1e-4 * I`` the same way.

    By default ``G`` = the number of ``classes``, or of their non-empty clusters for
    multi-centroid statistics, and every component is valid. With ``every_class`` the
    components are those of *every* class of the storage in a fixed order (``G = C``, or
    ``C * K``), ``valid`` marking the ones of ``classes`` (non-empty clusters); the others
    have zero mean and scale. Their shapes stay the same from task to task, so a compiled
    fit (:class:`ClassifierFit`) sees one shape for the whole run.

    ``skip_zero_variance``: a component whose stored variance is 0 on average (a cluster
    of one example, or of identical ones) is not drawn from (``valid`` False), as the
    official HiDe-Prompt sampler skips it (``if var.mean() == 0: continue``); by default it
    is drawn from with the ridge alone.
    """
    mode = statistics_mode(stats)
    classes = [int(c) for c in classes]
    count = np.asarray(stats["count"])
    missing = [c for c in classes if not np.any(count[c] > 0)]
    if missing:
        raise ValueError(f"no statistics stored for classes {missing}; compute them (after the "
                         f"classes' task) before sampling")
    dim = np.shape(stats["mean"])[-1]
    wanted = set(classes)
    means, scales, labels, valid = [], [], [], []

    def spread(variance) -> bool:  # False: the component is skipped when asked to
        return not (skip_zero_variance and float(np.mean(variance)) == 0.0)

    def add(c, mean, scale, is_valid):
        means.append(np.asarray(mean) if is_valid else np.zeros(dim))
        scales.append(scale if is_valid else np.zeros_like(scale))
        labels.append(c)
        valid.append(is_valid)

    for c in (range(count.shape[0]) if every_class else classes):
        chosen = c in wanted
        if mode == "covariance":
            cov = np.asarray(stats["cov"][c], np.float64)
            scale = (_psd_sqrt(cov + ridge * np.eye(dim)) if chosen
                     else np.zeros((dim, dim)))
            add(c, stats["mean"][c], scale, chosen and spread(np.diagonal(cov)))
        elif mode == "variance":
            var = np.asarray(stats["var"][c], np.float64)
            add(c, stats["mean"][c], np.sqrt(var + ridge), chosen and spread(var))
        else:
            clusters = range(count.shape[1]) if every_class else np.flatnonzero(count[c] > 0)
            for j in clusters:
                var = np.asarray(stats["var"][c, j], np.float64)
                add(c, stats["mean"][c, j], np.sqrt(var + ridge),
                    chosen and bool(count[c, j] > 0) and spread(var))
    return {"mean": np.stack(means).astype(np.float32),
            "scale": np.stack(scales).astype(np.float32),
            "label": np.asarray(labels, np.int32),
            "valid": np.asarray(valid, bool)}


def sample_components(key: Array, components: Mapping[str, Array], num_per_component: int
                      ) -> Tuple[Array, Array]:
    """``num_per_component`` draws from each Gaussian: features ``(G*n, D)`` and their class
    labels ``(G*n,)``, grouped by component (shuffle before batching). jit-compatible."""
    mean = jnp.asarray(components["mean"])
    scale = jnp.asarray(components["scale"])
    g, d = mean.shape
    z = jax.random.normal(key, (g, num_per_component, d), mean.dtype)
    if scale.ndim == 3:  # full covariance: x = mu + L z
        x = mean[:, None, :] + jnp.einsum("gij,gnj->gni", scale, z)
    else:
        x = mean[:, None, :] + scale[:, None, :] * z
    labels = jnp.repeat(jnp.asarray(components["label"]), num_per_component)
    return x.reshape(g * num_per_component, d), labels


# ----------------------------------------------------------- learning-rate schedules
# The training loop's and the classifier fits'. They take their lengths (epochs, steps per
# epoch, steps) as Python ints or as int32 arrays traced in a compiled step: the training
# loop keeps a task's lengths in the optimizer state, so one compiled train step serves
# tasks of every length.
def warmup_cosine_schedule(init_value: float, peak_value: float, warmup_steps: int,
                           decay_steps) -> Callable:
    """``optax.warmup_cosine_decay_schedule(init_value, peak_value, warmup_steps,
    decay_steps)`` (to 0) with ``decay_steps`` possibly traced: ``warmup_steps`` steps of
    linear warm-up from ``init_value``, then ``peak * (1 + cos(pi t / (decay_steps -
    warmup_steps))) / 2`` at ``t`` steps after the warm-up (0 past its end); the same
    operations as optax's, so the same float32 values."""
    span = decay_steps - warmup_steps

    def cosine(count):
        t = jnp.minimum(jnp.asarray(count, jnp.float32), jnp.asarray(span, jnp.float32))
        # optax's (1 - alpha) * decay ** exponent + alpha with alpha = 0, exponent = 1,
        # spelt as it spells it so that XLA sees the same float32 operations
        return peak_value * ((1 - 0.0) * (0.5 * (1 + jnp.cos(jnp.pi * t / jnp.asarray(
            span, jnp.float32)))) ** 1.0 + 0.0)
    if warmup_steps <= 0:
        return cosine
    return optax.join_schedules([optax.linear_schedule(init_value, peak_value, warmup_steps),
                                 cosine], [warmup_steps])


def cosine_epoch_schedule(learning_rate: float, epochs: int, steps_per_epoch: int) -> Callable:
    """PyTorch's ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch:
    ``lr_e = lr * (1 + cos(pi * e / epochs)) / 2`` for every step of epoch ``e``."""
    def schedule(count):
        epoch = jnp.floor_divide(count, jnp.maximum(1, steps_per_epoch))
        return learning_rate * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / jnp.maximum(1, epochs)))
    return schedule


def coda_cosine_schedule(learning_rate: float, epochs: int, steps_per_epoch: int) -> Callable:
    """The per-epoch ``CosineSchedule`` of CODA-Prompt's code base (InfLoRA reuses it), as
    it runs there: ``lr_e = lr cos(99 pi e' / (200 (E - 1)))`` with ``e' = max(e - 1, 0)``
    (its constructor's first step is undone, so the first two epochs share ``lr``); the
    last epoch runs at ``lr cos(99 pi (E - 2) / (200 (E - 1)))``."""
    def schedule(count):
        epoch = jnp.floor_divide(count, jnp.maximum(1, steps_per_epoch))
        shifted = jnp.maximum(epoch - 1, 0)
        return learning_rate * jnp.cos(
            99.0 * jnp.pi * shifted / (200.0 * jnp.maximum(1, epochs - 1)))
    return schedule


def timm_cosine_schedule(learning_rate: float, min_lr: float, epochs: int,
                         steps_per_epoch: int) -> Callable:
    """timm's ``CosineLRScheduler(t_initial=epochs, lr_min=min_lr)`` as the DualPrompt-PyTorch
    lineage's train loops step it (HiDe-Prompt's): ``scheduler.step(epoch)`` after each epoch
    sets the next epoch's rate one epoch late, so epoch ``e`` runs at
    ``min_lr + (lr - min_lr) (1 + cos(pi max(e - 1, 0) / epochs)) / 2``."""
    def schedule(count):
        epoch = jnp.floor_divide(count, jnp.maximum(1, steps_per_epoch))
        shifted = jnp.maximum(epoch - 1, 0)
        return min_lr + 0.5 * (learning_rate - min_lr) * (
            1.0 + jnp.cos(jnp.pi * shifted / jnp.maximum(1, epochs)))
    return schedule


def multistep_epoch_schedule(learning_rate: float, milestones: Sequence[int], decay: float,
                             steps_per_epoch: int) -> Callable:
    """PyTorch's ``MultiStepLR(milestones, gamma=decay)`` stepped once per epoch:
    ``lr_e = lr * decay ** (number of milestones <= e)`` for every step of epoch ``e``."""
    marks = jnp.asarray(sorted(int(m) for m in milestones), jnp.int32)  # may be empty

    def schedule(count):
        epoch = jnp.floor_divide(count, jnp.maximum(1, steps_per_epoch))
        return learning_rate * jnp.power(decay, jnp.sum(marks <= epoch))
    return schedule


# ------------------------------------------------------------- classifier alignment
class ClassifierFit:
    """Cross-entropy training of a classifier on drawn features, compiled once for a run.

    Every epoch draws a fresh set ``draw(key, draw_data) -> (features (N, D), labels (N,),
    valid (N,) bool)`` -- :func:`sampled_features` of the Gaussians of every class, or
    :func:`given_features` (real features padded to a fixed length) -- shuffles its valid
    rows and takes ``steps_per_epoch`` batches of ``batch_size`` from them (``drop_last``
    False: the last may run past the valid rows, which it leaves out of its mean loss, as a
    PyTorch loader's partial last batch). The update is
    ``p <- p - learning_rate(epoch) * direction(grads)``, what ``optax.sgd`` / ``optax.adam``
    compute with ``direction`` = ``trace(momentum)`` / ``scale_by_adam()`` (anything before
    the learning rate: clipping, coupled weight decay). ``logit_transform(logits,
    class_mask)``, if given, rescales the logits before the loss (SLCA's logit
    normalisation); logits outside ``class_mask`` are then masked out of the loss.

    Everything that changes from call to call -- the parameters, the draw's data, the class
    mask and the number of steps (a loop with a traced trip count) -- is an argument of one
    compiled program: a method that keeps its ``ClassifierFit`` for the run compiles it once,
    however many classes it has seen.
    """

    def __init__(self, apply_fn: Callable[[Any, Array], Array],
                 direction: optax.GradientTransformation,
                 learning_rate: Callable[[Array], Array], *, epochs: int, batch_size: int,
                 draw: Callable[[Array, Any], Tuple[Array, Array, Array]],
                 logit_transform: Optional[Callable[[Array, Array], Array]] = None,
                 drop_last: bool = True):
        if epochs <= 0 or batch_size <= 0:
            raise ValueError(f"ClassifierFit needs positive epochs and batch_size, got "
                             f"{epochs} and {batch_size}")
        self.apply_fn, self.direction, self.learning_rate = apply_fn, direction, learning_rate
        self.logit_transform = logit_transform
        self.epochs, self.batch_size, self.draw = int(epochs), int(batch_size), draw
        self.drop_last = bool(drop_last)
        self._compiled = compiler.jit(self._fit)

    def steps_per_epoch(self, available: int) -> int:
        """The batches of ``batch_size`` in ``available`` valid rows: the full ones, and the
        partial one unless ``drop_last``."""
        from pecft_jax.data.pipeline import steps_per_epoch  # numpy only
        return steps_per_epoch(available, self.batch_size, self.drop_last)

    def __call__(self, params: Any, key: Array, draw_data: Any, *, steps_per_epoch: int,
                 available: int, class_mask: Optional[np.ndarray] = None
                 ) -> Tuple[Any, np.ndarray]:
        """Trained parameters and the mean loss of each epoch. ``available`` is the number of
        valid rows a draw yields (checked: ``steps_per_epoch * batch_size <= available``,
        or that the last batch holds some of them when not ``drop_last``)."""
        return self.by_epoch(params, key, lambda epoch: draw_data, steps_per_epoch=steps_per_epoch,
                             available=available, class_mask=class_mask, one_call=True)

    def by_epoch(self, params: Any, key: Array, draw_data_of: Callable[[int], Any], *,
                 steps_per_epoch: int, available: int,
                 class_mask: Optional[np.ndarray] = None, one_call: bool = False
                 ) -> Tuple[Any, np.ndarray]:
        """:meth:`__call__` with the draw's data of each epoch from ``draw_data_of(epoch)``,
        run one epoch at a time (the parameters and the optimizer state carried over): real
        features computed afresh every epoch, as a loader of augmented images yields them.
        Every epoch keys its draw and its order by its index, so data that do not change
        give :meth:`__call__`'s result; ``one_call`` (the data never change) runs every
        epoch in one call."""
        steps = int(steps_per_epoch)
        if steps <= 0:
            raise ValueError(f"ClassifierFit needs a positive steps_per_epoch, got {steps}")
        # every batch full of valid rows, or all but the last, which needs one
        need = (steps * self.batch_size if self.drop_last
                else (steps - 1) * self.batch_size + 1)
        if need > available:
            raise ValueError(f"{steps} steps of {self.batch_size} need {need} features, the "
                             f"draw has {available}")
        # placeholders of the state's shapes, host zeros: the first epoch starts the state in
        # the compiled program (an eager optax init would compile a program per leaf shape)
        state = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                                       jax.eval_shape(self.direction.init, params))
        carry = (params, state, np.zeros((self.epochs,), np.float32))
        spans = [(0, self.epochs)] if one_call else [(e, e + 1) for e in range(self.epochs)]
        for first, last in spans:
            carry = self._compiled(carry, key, draw_data_of(first), np.int32(steps), class_mask,
                                   np.int32(first), np.int32(last))
        return carry[0], np.asarray(carry[2])

    def _fit(self, carry, key, draw_data, steps, class_mask, first, last):
        """Epochs ``first .. last - 1`` from ``carry = (params, direction state, losses)``; at
        epoch 0 the direction's state starts afresh."""
        from pecft_jax.methods.base import cross_entropy, mask_logits  # no import cycle
        batch = self.batch_size
        params, state, losses = carry
        state = jax.tree_util.tree_map(lambda fresh, held: jnp.where(first == 0, fresh, held),
                                       self.direction.init(params), state)
        carry = (params, state, losses)

        def loss_fn(p, x, y, weights):
            logits = self.apply_fn(p, x)
            if self.logit_transform is not None:
                logits = self.logit_transform(logits, class_mask)
            if class_mask is not None:
                logits = mask_logits(logits, class_mask)
            return cross_entropy(logits, y, weights)

        def epoch(e, carry):
            p, s, losses = carry
            k_draw, k_order = jax.random.split(jax.random.fold_in(key, e))
            x, y, valid = self.draw(k_draw, draw_data)
            # the valid rows first, in a random order
            order = jnp.argsort(jnp.where(valid, jax.random.uniform(k_order, valid.shape), 2.0))
            if not self.drop_last:
                # room for a last batch that runs past the rows (a slice would be clamped);
                # those rows are masked out
                order = jnp.concatenate([order, jnp.zeros((batch,), order.dtype)])
                num_valid = jnp.sum(valid)  # once an epoch, not once a step
            lr = self.learning_rate(e)

            def step(i, carry):
                p, s, total = carry
                rows = jax.lax.dynamic_slice_in_dim(order, i * batch, batch)
                weights = (None if self.drop_last else
                           (i * batch + jnp.arange(batch) < num_valid).astype(jnp.float32))
                loss, grads = jax.value_and_grad(loss_fn)(p, x[rows], y[rows], weights)
                direction, s = self.direction.update(grads, s, p)
                p = jax.tree_util.tree_map(lambda w, d: w - lr * d, p, direction)
                return p, s, total + loss

            p, s, total = jax.lax.fori_loop(0, steps, step, (p, s, jnp.zeros((), jnp.float32)))
            return p, s, losses.at[e].set(total / steps)

        return jax.lax.fori_loop(first, last, epoch, carry)


def given_features(key: Array, data: Tuple[Array, Array, Array]) -> Tuple[Array, Array, Array]:
    """A :class:`ClassifierFit` draw of real features: ``data`` = ``(features, labels,
    valid)`` itself, every epoch (``valid`` marks the rows that are not padding)."""
    del key
    return data


def sampled_features(num_per_component: int) -> Callable:
    """A :class:`ClassifierFit` draw of ``num_per_component`` samples from each Gaussian of
    :func:`gaussian_components` (``every_class=True``: the invalid ones are never used)."""
    def draw(key, components):
        x, y = sample_components(key, components, num_per_component)
        return x, y, jnp.repeat(jnp.asarray(components["valid"]), num_per_component)
    return draw


# ---------------------------------------------------- alignment on class Gaussians
def alignment_fit(apply_fn: Callable[[Any, Array], Array], *, learning_rate: float, epochs: int,
                  samples: int, momentum: float, weight_decay: float,
                  logit_transform: Optional[Callable[[Array, Array], Array]] = None
                  ) -> ClassifierFit:
    """The classifier alignment of SLCA, SSIAT and HiDe-Prompt, compiled once: every epoch
    draws ``samples`` features from each stored Gaussian and takes batches of ``samples``
    from them, PyTorch SGD with momentum and coupled weight decay, the learning rate on
    ``CosineAnnealingLR(T_max=epochs)`` stepped per epoch (what all three official codes
    run)."""
    direction = optax.chain(optax.add_decayed_weights(weight_decay),
                            optax.trace(momentum) if momentum else optax.identity())
    return ClassifierFit(apply_fn, direction, cosine_epoch_schedule(learning_rate, epochs, 1),
                         epochs=epochs, batch_size=samples, draw=sampled_features(samples),
                         logit_transform=logit_transform)


def mean_scales(task_of_class: np.ndarray, current_task: int, decay: float) -> np.ndarray:
    """``(C,)`` factors ``1 - decay + decay * (t_c + 1) / (t + 1)`` (``t_c`` the task of
    class ``c``, ``t`` the current one): SLCA's and SSIAT's official alignment draws class
    ``c``'s features around ``s_c * mu_c`` -- with ``decay = 0.1`` the current task's
    means are kept and the oldest shrink towards ``0.9 mu`` -- a heuristic of their code
    that the papers do not state. ``decay = 0`` keeps every mean."""
    owner = np.asarray(task_of_class, np.float64)
    return (1.0 - decay + decay * (owner + 1.0) / (int(current_task) + 1.0)).astype(np.float32)


def alignment_components(stats: Mapping[str, Any], classes: Sequence[int], *, ridge: float,
                         scales: Optional[np.ndarray] = None,
                         skip_zero_variance: bool = False) -> dict:
    """The Gaussians an alignment draws from: those of every class of the storage
    (:func:`gaussian_components` with ``every_class``; valid for ``classes``), each mean
    times ``scales[c]`` of its class if given (:func:`mean_scales`)."""
    components = gaussian_components(stats, classes, ridge=ridge, every_class=True,
                                     skip_zero_variance=skip_zero_variance)
    if scales is not None:
        components["mean"] = components["mean"] * np.asarray(scales)[components["label"], None]
    return components


def align_on_gaussians(fit: ClassifierFit, params: Any, stats: Mapping[str, Any],
                       classes: Sequence[int], class_mask: np.ndarray, key: Array, *,
                       ridge: float, steps: int, scales: Optional[np.ndarray] = None,
                       skip_zero_variance: bool = False) -> Any:
    """Trains ``params`` with ``fit`` (:func:`alignment_fit`) on features drawn from the
    Gaussians of ``classes`` (:func:`alignment_components`), ``steps`` batches per epoch,
    the loss over the classes in ``class_mask``. The Gaussians of every class of the
    storage go in with a validity mask, so one compiled program serves every task."""
    components = alignment_components(stats, classes, ridge=ridge, scales=scales,
                                      skip_zero_variance=skip_zero_variance)
    available = int(components["valid"].sum()) * fit.batch_size
    # skipped (zero-variance) components can leave fewer draws than `steps` batches
    steps = max(1, min(int(steps), available // fit.batch_size))
    params, _ = fit(params, key, components, steps_per_epoch=steps,
                    available=available, class_mask=class_mask)
    return params


def realign_seen_heads(fit: ClassifierFit, head: Any, stats: Mapping[str, Any], task, key: Array,
                       *, ridge: float, mean_decay: float) -> Any:
    """SLCA's and SSIAT's classifier alignment after task ``task`` (a concrete
    ``TaskSpec``): ``head`` -- a classifier whose leaves end in the class axis -- trained on
    the Gaussians of every seen class, their means times :func:`mean_scales`, one pass of
    the draws per epoch (a batch per seen class), the loss over the seen classes; the
    columns of classes not seen yet are kept as they were (in the official code they do not
    exist yet, so no weight decay reaches them)."""
    from pecft_jax.methods.base import keep_class_columns  # no import cycle
    seen = task.class_mask("seen")
    aligned = align_on_gaussians(
        fit, head, stats, task.seen_classes, seen, key, ridge=ridge,
        steps=len(task.seen_classes),
        scales=mean_scales(task.task_of_class(), task.index, mean_decay))
    return keep_class_columns(aligned, head, seen)

