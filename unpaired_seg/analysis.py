"""Disentanglement analysis of anatomy factors s and modality vectors z (numpy only, no JAX).

  * `distance_correlation(x, y)`: Szekely, Rizzo and Bakirov's (2007) sample distance correlation,
    dCor in [0, 1], 0 for independent samples (in the limit), 1 for y a similarity transform of x.
    The journal reports dCor(s, z) on test samples (FiLM 0.55, SPADE 0.78).
  * `modality_classifier(z, modality)`: a logistic regression (L2-regularised, fitted with scipy's
    L-BFGS) that predicts the modality from z, its held-out accuracy, and the accuracy of one
    regression per dimension of z.
  * `traversal_png(images)`: a grid of decoded images as each z dimension runs over [-3, 3], as
    PNG bytes (matplotlib Agg); `save_traversal(images, path)` writes them to a file.

  python -m pytest -q tests/test_analysis.py
"""

import io
import pathlib
from collections.abc import Sequence

import numpy as np
import scipy.optimize


def _double_centred_distances(x: np.ndarray) -> np.ndarray:
  """A_jk = a_jk - mean_j a_jk - mean_k a_jk + mean a, a_jk = ||x_j - x_k|| (Euclidean)."""
  sq = np.sum(x * x, axis=1)
  d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
  np.fill_diagonal(d2, 0.0)
  a = np.sqrt(d2)
  return a - a.mean(axis=0, keepdims=True) - a.mean(axis=1, keepdims=True) + a.mean()


def _as_samples(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim == 1:
    x = x[:, None]
  if x.ndim < 1 or x.shape[0] < 2:
    raise ValueError(f"distance_correlation: `{name}` needs at least 2 samples on axis 0, got "
                     f"shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"distance_correlation: `{name}` has non-finite values")
  return x.reshape(x.shape[0], -1)


def distance_correlation(x, y) -> float:
  """Sample distance correlation dCor(x, y) of paired samples.

  dCov^2 = mean(A * B), dVar^2(x) = mean(A * A), dCor = sqrt(dCov^2 / sqrt(dVar^2(x) dVar^2(y)))
  with A, B the double-centred Euclidean distance matrices; 0 when either variance is 0.

  Args:
    x: [n, ...] samples (flattened per sample), e.g. anatomy factors [n, H, W, A].
    y: [n, ...] samples, e.g. modality vectors [n, Z].

  Returns:
    dCor in [0, 1].
  """
  x = _as_samples("x", x)
  y = _as_samples("y", y)
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"distance_correlation: `x` and `y` need the same number of samples, got "
                     f"{x.shape[0]} and {y.shape[0]}")
  a = _double_centred_distances(x)
  b = _double_centred_distances(y)
  dcov2 = np.mean(a * b)
  dvar = np.sqrt(np.mean(a * a) * np.mean(b * b))
  if dvar <= 0:
    return 0.0
  return float(np.sqrt(np.clip(dcov2 / dvar, 0.0, 1.0)))


# ------------------------------------------------------------------------------------------------
# Logistic regression.
# ------------------------------------------------------------------------------------------------


def fit_logistic_regression(x, y, l2: float = 1e-3) -> tuple[np.ndarray, float]:
  """Fits p(y = 1 | x) = sigmoid(x w + b) by L-BFGS on the mean log-loss + l2 / 2 ||w||^2.

  Args:
    x: [n, d] features (standardised inside; the returned weights apply to the raw x).
    y: [n] labels in {0, 1}.
    l2: ridge strength on w (keeps separable data from diverging).

  Returns:
    (w [d], b).
  """
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise ValueError(f"fit_logistic_regression: `x` must be [n, d] and `y` [n], got {x.shape} "
                     f"and {y.shape}")
  if not np.all((y == 0) | (y == 1)):
    raise ValueError("fit_logistic_regression: `y` must hold 0 and 1 only")
  mu, sd = x.mean(axis=0), x.std(axis=0)
  sd = np.where(sd > 0, sd, 1.0)
  xs = (x - mu) / sd
  n, d = xs.shape

  def loss_and_grad(theta):
    w, b = theta[:d], theta[d]
    logits = xs @ w + b
    # log(1 + exp(t)) - y t, stable for large |t|.
    loss = np.mean(np.logaddexp(0.0, logits) - y * logits) + 0.5 * l2 * w @ w
    p = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without overflow
    g = p - y
    return loss, np.concatenate([xs.T @ g / n + l2 * w, [np.mean(g)]])

  result = scipy.optimize.minimize(loss_and_grad, np.zeros(d + 1), jac=True, method="L-BFGS-B")
  w_std, b_std = result.x[:d], result.x[d]
  w = w_std / sd
  return w, float(b_std - mu @ w)


def predict_logistic_regression(x, w: np.ndarray, b: float) -> np.ndarray:
  """[n] predicted labels (0/1) of [n, d] features."""
  return (np.asarray(x, np.float64) @ w + b > 0).astype(np.int64)


def modality_classifier(z, modality, *, train_fraction: float = 0.5, seed: int = 0) -> dict:
  """How well a logistic regression tells the modality from z, overall and per dimension.

  The samples are split at random (seeded) into a training and a held-out part, stratified by
  modality; accuracies are on the held-out part.

  Args:
    z: [n, Z] modality vectors.
    modality: [n] labels 0/1 (e.g. 0 = MR, 1 = CT).
    train_fraction: share of each modality used to fit.
    seed: of the split.

  Returns:
    {"accuracy": float, "per_dimension": [Z floats], "train_samples": int, "test_samples": int}.
  """
  z = np.asarray(z, np.float64)
  modality = np.asarray(modality)
  if z.ndim != 2 or modality.shape != (z.shape[0],):
    raise ValueError(f"modality_classifier: `z` must be [n, Z] and `modality` [n], got {z.shape} "
                     f"and {modality.shape}")
  rng = np.random.default_rng(seed)
  train = np.zeros(len(z), bool)
  for value in (0, 1):
    members = np.flatnonzero(modality == value)
    if len(members) < 2:
      raise ValueError(f"modality_classifier: needs at least 2 samples of each modality, got "
                       f"{len(members)} of modality {value}")
    chosen = rng.permutation(members)[:max(1, int(round(train_fraction * len(members))))]
    train[chosen] = True
  test = ~train

  def accuracy(features):
    w, b = fit_logistic_regression(features[train], modality[train])
    return float(np.mean(predict_logistic_regression(features[test], w, b) == modality[test]))

  return {"accuracy": accuracy(z),
          "per_dimension": [accuracy(z[:, [d]]) for d in range(z.shape[1])],
          "train_samples": int(train.sum()), "test_samples": int(test.sum())}


# ------------------------------------------------------------------------------------------------
# Latent traversal.
# ------------------------------------------------------------------------------------------------


def traversal_values(steps: int = 7, limit: float = 3.0) -> np.ndarray:
  """The values each z dimension takes in a traversal: `steps` points from -limit to limit."""
  return np.linspace(-limit, limit, steps)


def traversal_png(images: np.ndarray, *, row_labels: Sequence[str] = (),
                  values: Sequence[float] = ()) -> bytes:
  """A grid of images (row r: z dimension r; column c: its c-th value) as PNG bytes.

  Args:
    images: [rows, cols, H, W] (or [rows, cols, H, W, 1]) images in [-1, 1].
    row_labels: one label per row (e.g. 'mr z0').
    values: one value per column, shown above the first row.

  Returns:
    The PNG file's bytes.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  images = np.asarray(images, np.float32)
  if images.ndim == 5 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim != 4:
    raise ValueError(f"traversal_png: `images` must be [rows, cols, H, W], got {images.shape}")
  rows, cols = images.shape[:2]
  fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows), squeeze=False)
  for r in range(rows):
    for c in range(cols):
      ax = axes[r, c]
      ax.imshow(images[r, c].T, cmap="gray", vmin=-1, vmax=1, origin="lower")
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0 and len(values) == cols:
        ax.set_title(f"{values[c]:+.1f}", fontsize=7)
      if c == 0 and len(row_labels) == rows:
        ax.set_ylabel(row_labels[r], fontsize=7)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=80)
  plt.close(fig)
  return buffer.getvalue()


def save_traversal(images: np.ndarray, path: pathlib.Path, *, row_labels: Sequence[str] = (),
                   values: Sequence[float] = ()) -> pathlib.Path:
  """Writes `traversal_png(images, ...)` to `path` (its folder made if needed); returns `path`."""
  png = traversal_png(images, row_labels=row_labels, values=values)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(png)
  return path
