"""Helpers and slow numpy references (float64, explicit loops over kernel offsets) of the
disentanglement networks, shared by tests/nn/test_disentangle*.py."""

import jax
import jax.numpy as jnp
import numpy as np

MODALITIES = ("mr", "ct")
EPS = 1e-3  # Keras' batch norm epsilon, the encoder's default


def _key(seed):
  """A PRNG key whose random-bit generator compiles much faster on CPU than threefry's."""
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _onehot_factor(seed, shape):
  """A random binary one-hot factor [B, H, W, C]."""
  labels = np.random.default_rng(seed).integers(0, shape[-1], size=shape[:-1])
  return jnp.asarray(np.eye(shape[-1])[labels], jnp.float32)


def _init(module, rng, *arrays, **static):
  """`module.init` under jit (op-by-op eager init compiles every op and is slow on CPU)."""
  return jax.jit(lambda r, *a: module.init(r, *a, **static))(rng, *arrays)


def _shapes(module, rngs, *arrays, **static):
  """The variables `module.init` would create, as shapes, without compiling or running it."""
  return jax.eval_shape(lambda r, *a: module.init(r, *a, **static), rngs, *arrays)


def _output_shape(module, rngs, *arrays, **static):
  """The output shape of `module` at init, without compiling or running it."""
  out = jax.eval_shape(lambda r, *a: module.init_with_output(r, *a, **static)[0], rngs, *arrays)
  return jax.tree.map(lambda a: a.shape, out)


def _apply(module, variables, *arrays, **static):
  """`module.apply` under jit, keyword arguments static."""
  return jax.jit(lambda v, *a: module.apply(v, *a, **static))(variables, *arrays)


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------
# Slow numpy references (float64, explicit loops over kernel offsets).
# ------------------------------------------------------------------------------------------------


def _conv(x, kernel, bias=None, stride=1, padding="SAME"):
  """Cross-correlation of [B, H, W, C] with [kh, kw, C, F]; SAME for odd kernels at stride 1."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  if padding == "SAME":
    x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out += patch @ kernel[i, j]
  if bias is not None:
    out += np.asarray(bias, np.float64)
  return out


def _leaky(x, slope):
  return np.where(x >= 0, x, slope * x)


def _relu(x):
  return np.maximum(x, 0.0)


def _dense(x, p):
  return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _batch_norm_eval(x, norm, stats, eps=EPS):
  return ((x - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + eps)
          * np.asarray(norm["scale"]) + np.asarray(norm["bias"]))


def _conv_norm_block(x, params, norm, stats, prefix=("conv0", "norm0", "conv1", "norm1")):
  for conv, nrm in (prefix[:2], prefix[2:]):
    x = _relu(_batch_norm_eval(_conv(x, params[conv]["kernel"]), norm[nrm], stats[nrm]))
  return x


def _max_pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _upsample(x):
  return x.repeat(2, axis=1).repeat(2, axis=2)


def _anatomy_reference(variables, x, modality, variant, depth, group="shared"):
  """The U-Net in eval mode from the variables, block names resolved by hand."""
  per_modality = {"dafnet": lambda b: b.startswith("enc"), "mmsdnet": lambda b: True}[variant]
  name = lambda b: f"{b}_{modality}" if per_modality(b) else b
  params = variables["params"]
  norm = variables[f"norm_{group}"]
  stats = variables[f"stats_{group}"]
  x = np.asarray(x, np.float64)
  skips = []
  for level in range(depth):
    b = name(f"enc{level}")
    x = _conv_norm_block(x, params[b], norm[b], stats[b])
    skips.append(x)
    x = _max_pool(x)
  b = name("bottleneck")
  x = _conv_norm_block(x, params[b], norm[b], stats[b])
  for level in reversed(range(depth)):
    b = name(f"dec{level}")
    x = _conv(_upsample(x), params[b]["up_conv"]["kernel"])
    x = _batch_norm_eval(x, norm[b]["up_norm"], stats[b]["up_norm"])
    x = np.concatenate([x, skips[level]], axis=-1)
    x = _conv_norm_block(x, params[b]["conv"], norm[b]["conv"], stats[b]["conv"])
  b = name("head")
  return _softmax(_conv(x, params[b]["conv"]["kernel"], params[b]["conv"]["bias"]))


def _numpy_init(module, rngs, *arrays, seed=0, **static):
  """Variables with the structure and shapes `module.init` gives, filled from numpy.

  Skips compiling the random initialisers (slow on CPU), and gives every bias, norm scale and
  running statistic a non-trivial value, so a reference that ignored one would disagree.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _shapes(module, rngs, *arrays, **static))
