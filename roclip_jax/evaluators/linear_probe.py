"""Linear probe: multinomial logistic regression on frozen image features.

Protocol: features are the un-normalised image-tower output (CyCLIP/RoCLIP); they are standardised
with the training split's mean and std. The classifier is fitted full-batch with L-BFGS (CLIP's
protocol, rather than CyCLIP's 32 AdamW epochs, so there is no learning rate or epoch count to
tune). The L2 strength is chosen from a small grid on a validation part carved (seeded) from the
training split, then the classifier is refitted on train+val and scored on the test split.

Objective: mean cross-entropy + l2 / 2 * ||W||^2 (the bias is not penalised).

Selection defaults to the lowest validation cross-entropy: a proper score that changes smoothly
with l2, so the choice is stable on small validation sets where accuracy is tied or noisy.
`select_by='accuracy'` picks the highest validation accuracy (ties: the lower cross-entropy).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from roclip_jax.evaluators import common

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
SELECT_BY = ("loss", "accuracy")


@dataclasses.dataclass(frozen=True)
class ProbeFit:
  """A fitted probe: logits = ((features - mean) / std) @ weights + bias."""

  weights: np.ndarray  # [f, C]
  bias: np.ndarray  # [C]
  mean: np.ndarray  # [f]
  std: np.ndarray  # [f]
  l2: float
  val_loss: dict[float, float]
  val_accuracy: dict[float, float]

  def logits(self, features: np.ndarray) -> np.ndarray:
    return ((features - self.mean) / self.std) @ self.weights + self.bias


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit_lbfgs(
    x: jax.Array, y: jax.Array, l2: jax.Array, *, num_classes: int, max_iter: int, tol: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Minimises mean CE + l2/2 ||W||^2 from zero with optax's L-BFGS (zoom line search)."""

  def objective(params):
    weights, bias = params
    logits = x @ weights + bias
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(weights * weights)

  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(params, updates), state

  def not_done(carry):
    _, state = carry
    count = otu.tree_get(state, "count")
    grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

  params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))
  params, _ = jax.lax.while_loop(not_done, step, (params, solver.init(params)))
  return params


def _solve(
    x: np.ndarray, y: np.ndarray, l2: float, num_classes: int, max_iter: int, tol: float
) -> tuple[np.ndarray, np.ndarray]:
  # Explicit transfers both ways: the trainer runs with jax_transfer_guard='disallow'.
  args = jax.device_put((np.asarray(x, np.float32), np.asarray(y, np.int32), np.float32(l2), np.float32(tol)))
  weights, bias = jax.device_get(
      _fit_lbfgs(args[0], args[1], args[2], num_classes=num_classes, max_iter=max_iter, tol=args[3])
  )
  return np.asarray(weights), np.asarray(bias)


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  logits = logits - logits.max(axis=1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def fit_linear_probe(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    num_classes: int,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    select_by: str = "loss",
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> ProbeFit:
  """Sweeps l2 on a seeded validation split of (features, labels), refits on all of them."""
  features = np.asarray(features, np.float64)
  labels = np.asarray(labels, np.int64)
  if features.ndim != 2 or labels.shape != (features.shape[0],):
    raise ValueError(f"Linear probe needs features [N, f] and labels [N], got {features.shape} " f"and {labels.shape}.")
  if select_by not in SELECT_BY:
    raise ValueError(f"select_by={select_by!r} is not one of {list(SELECT_BY)}.")
  if not 0 < val_fraction < 1 or not l2_grid or min(l2_grid) < 0:
    raise ValueError("Linear probe needs 0 < val_fraction < 1 and a non-empty grid of l2 >= 0.")
  num_val = int(round(val_fraction * len(labels)))
  if num_val < 1 or num_val >= len(labels):
    raise ValueError(
        f"val_fraction={val_fraction} of {len(labels)} training examples leaves an "
        "empty train or validation part; use more examples or another fraction."
    )
  order = np.random.default_rng(seed).permutation(len(labels))
  val, train = order[:num_val], order[num_val:]

  def standardise(rows):
    mean = features[rows].mean(axis=0)
    std = np.maximum(features[rows].std(axis=0), 1e-6)  # constant features stay finite
    return mean, std

  mean, std = standardise(train)
  x_train = (features[train] - mean) / std
  x_val = (features[val] - mean) / std
  val_loss, val_accuracy = {}, {}
  for l2 in l2_grid:
    weights, bias = _solve(x_train, labels[train], l2, num_classes, max_iter, tol)
    logits = x_val @ weights + bias
    val_loss[float(l2)] = _cross_entropy(logits, labels[val])
    val_accuracy[float(l2)] = float(common.topk_hits(logits, labels[val], 1).mean())

  if select_by == "loss":
    best = min(val_loss, key=lambda l2: (val_loss[l2], -l2))
  else:
    best = max(val_accuracy, key=lambda l2: (val_accuracy[l2], -val_loss[l2], l2))
  mean, std = standardise(order)
  weights, bias = _solve((features - mean) / std, labels, best, num_classes, max_iter, tol)
  return ProbeFit(weights=weights, bias=bias, mean=mean, std=std, l2=best, val_loss=val_loss, val_accuracy=val_accuracy)


def cap_per_class(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
  """Sorted indices keeping at most `max_per_class` random examples of each class (0: all)."""
  if max_per_class <= 0:
    return np.arange(len(labels))
  rng = np.random.default_rng(seed)
  keep = [rng.permutation(np.flatnonzero(labels == c))[:max_per_class] for c in np.unique(labels)]
  return np.sort(np.concatenate(keep))


class LinearProbeEvaluator(common.Evaluator):
  """Test top-1 of a logistic-regression probe on frozen image features."""

  def __init__(
      self,
      name: str,
      *,
      every_steps: int,
      load_train: common.LoadSplit,
      load_test: common.LoadSplit,
      max_train_per_class: int = 0,
      l2_grid: Sequence[float] = DEFAULT_L2_GRID,
      val_fraction: float = 0.2,
      select_by: str = "loss",
      seed: int = 0,
      max_iter: int = 1000,
  ):
    super().__init__(name, every_steps=every_steps)
    if select_by not in SELECT_BY:
      raise ValueError(f"evals.{name}.select_by={select_by!r} is not one of {list(SELECT_BY)}.")
    self._load_train = load_train
    self._load_test = load_test
    self._fit_kwargs = dict(
        l2_grid=tuple(l2_grid), val_fraction=val_fraction, select_by=select_by, seed=seed, max_iter=max_iter
    )
    self._max_train_per_class = max_train_per_class
    self._seed = seed

  @functools.cached_property
  def _data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    train, test = self._load_train(), self._load_test()
    if list(train.class_names) != list(test.class_names):
      raise ValueError(
          f"Evaluator {self.name!r}: train and test splits have different class " "names; probe a single dataset."
      )
    num_classes = len(train.class_names)
    train_labels = common.check_labels(self.name, train.labels, num_classes)
    keep = cap_per_class(train_labels, self._max_train_per_class, self._seed)
    test_labels = common.check_labels(self.name, test.labels, num_classes)
    return train.images[keep], train_labels[keep], test.images, test_labels, num_classes

  def run(self, encoder: common.Encoder) -> dict[str, float]:
    train_images, train_labels, test_images, test_labels, num_classes = self._data
    train_x = common.check_encoded(self.name, encoder.image_features(train_images), len(train_images))
    test_x = common.check_encoded(self.name, encoder.image_features(test_images), len(test_images))
    fit = fit_linear_probe(train_x, train_labels, num_classes=num_classes, **self._fit_kwargs)
    top1 = common.topk_hits(fit.logits(test_x.astype(np.float64)), test_labels, 1).mean()
    return self._metrics({"top1": top1, "l2": fit.l2, "val_top1": fit.val_accuracy[fit.l2]})
