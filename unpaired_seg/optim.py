"""Learning-rate schedules and optimisers of the supervised methods (config section `train`).

Pure optax. The default (`lr_schedule='exponential'`, `optimizer='adam'`, `grad_clip=0`,
`lr_warmup_steps=0`) is exactly the optimiser the methods always had, state structure included,
so existing configs and checkpoints are unchanged. nnU-Net's schedule is

  --config.train.optimizer=sgd --config.train.momentum=0.99 --config.train.lr_schedule=poly
  --config.train.learning_rate=1e-2 --config.train.grad_clip=12 --config.loss.weight_decay=3e-5

(its SGD weight decay of 3e-5 is a coupled L2 term, which is what `loss.weight_decay` adds).
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("exponential", "poly")
OPTIMIZERS = ("adam", "adamw", "sgd")


def _train_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  # `supervised.learning_rate_schedule(config)` took the whole config; that call keeps working.
  return config.train if "train" in config else config


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate of update `count` (0 for the first update, as optax counts).

  exponential: lr * lr_decay.rate ** (count / lr_decay.every)
  poly:        lr * (1 - count / T) ** lr_poly_exponent, T = steps - lr_warmup_steps (nnU-Net's
               poly_lr; the last update, count = steps - 1, still has a small positive rate)
  With W = lr_warmup_steps > 0, update `count` < W uses lr * (count + 1) / (W + 1) (a linear ramp
  that never spends an update at rate 0 and reaches lr on the first update after it), and the
  schedule proper starts at count = W as if from 0: warm-up delays it instead of cutting its
  first W updates.
  """
  t = _train_section(train_config)
  lr = t.learning_rate
  warmup = t.lr_warmup_steps
  if warmup and t.steps and warmup >= t.steps:
    raise ValueError(f"config key 'train.lr_warmup_steps' ({warmup}) must be below train.steps "
                     f"({t.steps}): the warm-up would be the whole run")
  if t.lr_schedule == "exponential":
    main = optax.exponential_decay(lr, transition_steps=t.lr_decay.every,
                                   decay_rate=t.lr_decay.rate)
  elif t.lr_schedule == "poly":
    # max(.., 1): a 0-step config (evaluation only) still builds; polynomial_schedule would warn.
    main = optax.polynomial_schedule(init_value=lr, end_value=0.0, power=t.lr_poly_exponent,
                                     transition_steps=max(t.steps - warmup, 1))
  else:
    raise ValueError(f"config key 'train.lr_schedule': {t.lr_schedule!r} is not one of "
                     f"{SCHEDULES}")
  if not warmup:
    return main

  def schedule(count):
    ramp = lr * (count + 1) / (warmup + 1)
    # The maximum keeps the unused branch finite (exponential decay at a negative count grows).
    return jnp.where(count < warmup, ramp, main(jnp.maximum(count - warmup, 0)))
  return schedule


def _kernels(params):
  """True on the leaves of rank >= 2 (conv and dense kernels), False on biases and norm scales.

  AdamW's decoupled decay pulls toward zero; on a bias or a normalisation scale that is no
  regularisation, only a shrinking of the layer's output scale.
  """
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(train_config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """`train.optimizer` at `schedule`, after clipping by the global norm when `train.grad_clip`."""
  t = _train_section(train_config)
  if t.optimizer == "adam":
    tx = optax.adam(schedule, eps=t.adam_epsilon)
  elif t.optimizer == "adamw":
    tx = optax.adamw(schedule, eps=t.adam_epsilon, weight_decay=t.adamw_weight_decay,
                     mask=_kernels)
  elif t.optimizer == "sgd":
    # Nesterov as PyTorch's (and nnU-Net's): v = mu v + g, update = -lr (g + mu v).
    tx = optax.sgd(schedule, momentum=t.momentum, nesterov=True)
  else:
    raise ValueError(f"config key 'train.optimizer': {t.optimizer!r} is not one of {OPTIMIZERS}")
  if t.grad_clip > 0:
    # Only when on: a chain would nest the optimiser's state one level down, and checkpoints
    # saved without clipping restore into the state's structure.
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
  return tx
