"""The weight averages (methods/averaging.py) against values worked out by hand.

  python -m pytest -q tests/methods/test_averaging.py
"""

import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.methods import averaging


def test_swa_tracks_the_value_before_its_start_then_is_the_mean_from_there():
  values = [4.0, 1.0, 3.0, 8.0]
  active = [False, True, True, True]
  # Inactive: the value itself, count 0; then the means of 1; 1, 3; 1, 3, 8.
  expected = [(4.0, 0), (1.0, 1), (2.0, 2), (4.0, 3)]
  average = {"a": jnp.float32(0.0), "b": jnp.zeros(2, jnp.float32)}
  count = jnp.zeros((), jnp.int32)
  for v, on, (mean, n) in zip(values, active, expected):
    value = {"a": jnp.float32(v), "b": jnp.array([2 * v, -v], jnp.float32)}
    average, count = averaging.swa_update(average, value, count, jnp.asarray(on))
    assert int(count) == n
    assert float(average["a"]) == pytest.approx(mean, abs=1e-6)
    np.testing.assert_allclose(np.asarray(average["b"]), [2 * mean, -mean], atol=1e-6)


def test_swa_restarts_when_it_is_switched_off_again():
  average, count = averaging.swa_update(jnp.float32(5.0), jnp.float32(7.0), jnp.int32(4),
                                        jnp.asarray(False))
  assert float(average) == 7.0 and int(count) == 0


def test_ema_is_the_bias_corrected_weighted_mean_of_the_values_so_far():
  d = jnp.float32(0.5)
  # w_n = (1 - d) / (1 - d**n): 1, 2/3, 4/7.
  weights = [float(averaging.ema_weight(d, jnp.int32(n))) for n in (1, 2, 3)]
  assert weights[0] == 1.0                          # the first average is the first value
  np.testing.assert_allclose(weights[1:], [2 / 3, 4 / 7], rtol=1e-6)
  ema = jnp.float32(123.0)                          # the start drops out at w_1 = 1
  for n, v in enumerate((1.0, 3.0, 8.0), start=1):
    ema = averaging.ema_mover(d, jnp.int32(n))(ema, jnp.float32(v))
  # sum_i d**(3-i) v_i / sum_i d**(3-i) = (0.25 + 1.5 + 8) / 1.75 = 39 / 7.
  assert float(ema) == pytest.approx(39 / 7, rel=1e-6)
  assert float(averaging.ema_move(jnp.float32(2.0), jnp.float32(6.0), jnp.float32(0.25))) == 3.0
