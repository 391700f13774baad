"""Distance correlation against a direct loop, the logistic regression, the traversal PNG."""

import numpy as np
import pytest

from unpaired_seg import analysis


def _dcor_loop(x, y):
  """Szekely et al.'s definitions written out element by element (the independent oracle)."""
  n = len(x)

  def centred(v):
    a = np.zeros((n, n))
    for j in range(n):
      for k in range(n):
        a[j, k] = np.sqrt(np.sum((v[j] - v[k]) ** 2))
    row = [sum(a[j, k] for k in range(n)) / n for j in range(n)]
    col = [sum(a[j, k] for j in range(n)) / n for k in range(n)]
    total = sum(row) / n
    return np.array([[a[j, k] - row[j] - col[k] + total for k in range(n)] for j in range(n)])

  a, b = centred(x), centred(y)
  dcov = sum(a[j, k] * b[j, k] for j in range(n) for k in range(n)) / n ** 2
  vx = sum(a[j, k] ** 2 for j in range(n) for k in range(n)) / n ** 2
  vy = sum(b[j, k] ** 2 for j in range(n) for k in range(n)) / n ** 2
  return np.sqrt(dcov / np.sqrt(vx * vy))


def test_distance_correlation_matches_a_direct_loop():
  r = np.random.default_rng(0)
  x = r.standard_normal((12, 2, 3))
  y = np.concatenate([x.reshape(12, -1)[:, :2] ** 2, r.standard_normal((12, 1))], axis=1)
  expected = _dcor_loop(x.reshape(12, -1), y)
  assert analysis.distance_correlation(x, y) == pytest.approx(expected, rel=1e-9)
  assert 0.0 < expected < 1.0


def test_distance_correlation_of_a_sample_with_itself_or_a_similarity_transform_is_one():
  x = np.random.default_rng(1).standard_normal((20, 4))
  assert analysis.distance_correlation(x, x) == pytest.approx(1.0, abs=1e-9)
  assert analysis.distance_correlation(x, -2.5 * x + 7.0) == pytest.approx(1.0, abs=1e-9)
  # Hand-computed: 1D samples 0, 1, 2 against themselves.
  assert analysis.distance_correlation([0.0, 1.0, 2.0], [0.0, 1.0, 2.0]) == pytest.approx(1.0)


def test_distance_correlation_of_independent_samples_is_small_and_constant_gives_zero():
  r = np.random.default_rng(2)
  x, y = r.standard_normal((300, 3)), r.standard_normal((300, 2))
  assert analysis.distance_correlation(x, y) < 0.2
  assert analysis.distance_correlation(x, np.ones((300, 2))) == 0.0


def test_distance_correlation_rejects_bad_input():
  with pytest.raises(ValueError, match="same number of samples"):
    analysis.distance_correlation(np.zeros((4, 2)), np.zeros((5, 2)))
  with pytest.raises(ValueError, match="`y`"):
    analysis.distance_correlation(np.zeros((4, 2)), np.full((4, 2), np.nan))


def _irls(x, y, iterations=50):
  """Unregularised logistic regression by Newton's method in the raw features (the oracle)."""
  xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  theta = np.zeros(xb.shape[1])
  for _ in range(iterations):
    p = 1.0 / (1.0 + np.exp(-xb @ theta))
    hessian = xb.T @ (xb * (p * (1 - p))[:, None])
    theta = theta + np.linalg.solve(hessian, xb.T @ (y - p))
  return theta[:-1], theta[-1]


def test_logistic_regression_matches_newtons_method_on_overlapping_classes():
  r = np.random.default_rng(3)
  y = (r.random(200) < 0.5).astype(float)
  x = r.standard_normal((200, 2)) * [1.0, 3.0] + y[:, None] * [1.0, -2.0] + [5.0, 0.0]
  w, b = analysis.fit_logistic_regression(x, y, l2=0.0)
  w_ref, b_ref = _irls(x, y)
  np.testing.assert_allclose(w, w_ref, rtol=1e-3, atol=1e-4)
  assert b == pytest.approx(b_ref, rel=1e-3, abs=1e-4)


def test_modality_classifier_finds_the_informative_dimension():
  r = np.random.default_rng(4)
  modality = np.repeat([0, 1], 60)
  z = np.stack([modality * 4.0 + r.standard_normal(120), r.standard_normal(120)], axis=1)
  out = analysis.modality_classifier(z, modality)
  assert out["accuracy"] >= 0.95
  assert out["per_dimension"][0] >= 0.95
  assert out["per_dimension"][1] < 0.75
  assert out["train_samples"] + out["test_samples"] == 120
  with pytest.raises(ValueError, match="each modality"):
    analysis.modality_classifier(z[:61], modality[:61])


def test_traversal_png_is_written(tmp_path):
  images = np.tanh(np.random.default_rng(5).standard_normal((3, 7, 16, 16)))
  path = analysis.save_traversal(images, tmp_path / "t.png", row_labels=["a", "b", "c"],
                                 values=analysis.traversal_values())
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  np.testing.assert_allclose(analysis.traversal_values(), np.linspace(-3, 3, 7))
  with pytest.raises(ValueError, match="rows, cols"):
    analysis.save_traversal(images[0], tmp_path / "bad.png")
