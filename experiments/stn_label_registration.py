"""How much of a paired phantom's MR/CT misalignment the spatial transformer can undo, from LABELS.

The MMSDNet transformer (localisation net + 5 x 5 thin-plate spline, the width of
configs/mmsdnet.py) trained alone to warp each CT slice's partner MR label onto the CT slice's
label (1 - soft Dice per organ, background left out), with the ground truth of both: an upper
bound for what the transformer inside MMSDNet, which sees only learned anatomies, can gain. It
prints the test pairs' label overlap (Dice per organ pooled over slices, mean over organs)
unwarped and warped, and the mean control-point offset, every 250 steps.

  python experiments/stn_label_registration.py --misalignment=3 --steps=1000
  python experiments/stn_label_registration.py --misalignment=1 --learning_rate=1e-3

Slices in the pairs differ by the phantom's in-plane deformation (`misalignment` times the
default's, about 2 voxels at the peak) and by through-plane offsets no in-plane warp undoes, so
the bound is below 1.
"""

import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import mmsdnet  # noqa: E402
from unpaired_seg.data import loader  # noqa: E402
from unpaired_seg.methods.mmsdnet import evaluation as mmsdnet_eval  # noqa: E402
from unpaired_seg.methods.mmsdnet import pairing as pairing_lib  # noqa: E402
from unpaired_seg.nn import stn as stn_lib  # noqa: E402
from unpaired_seg.ops import similarity, tps  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_float("misalignment", 1.0, "the paired phantom's in-plane deformation between MR "
                     "and CT, as a multiple of the default's (0..4)", lower_bound=0.0,
                     upper_bound=4.0)
  flags.DEFINE_float("learning_rate", 1e-4, "Adam rate of the transformer (MMSDNet's: 1e-4)")
  flags.DEFINE_integer("steps", 1000, "training steps of 8 pairs")
  flags.DEFINE_integer("seed", 0, "initialisation, batches and the phantom's split")


def label_pairs(data, part: str) -> tuple[np.ndarray, np.ndarray]:
  """(CT labels, their expert-partner MR labels) of every slice of `part`, [N, H, W] each; the
  partners as MMSDNet's training and its `alignment` evaluation choose them."""
  mr, ct = data.cases[part]["mr"], data.cases[part]["ct"]
  partner_index = {c.subject: n for n, c in enumerate(mr)}
  fixed, moving = [], []
  for pos, case in enumerate(ct):
    for z in range(case.num_slices):
      p, zp = pairing_lib.candidates("expert", 1, 0, case, pos, z, mr, partner_index, "mr",
                                     rng=None)[0]
      fixed.append(case.label[:, :, z])
      moving.append(mr[p].label[:, :, zp])
  return np.stack(fixed).astype(np.int32), np.stack(moving).astype(np.int32)


def mean_dice(a: np.ndarray, b: np.ndarray, class_names) -> float:
  """Dice per foreground class pooled over all slices, mean over the classes present: the
  `alignment` block's figure of summary.json, so the bound compares with it."""
  counts = mmsdnet_eval.dice_counts(a, b, len(class_names))
  return mmsdnet_eval.pooled_dice(counts, class_names)["mean"]


def run(config, steps: int, learning_rate: float, seed: int, workdir: pathlib.Path,
        report=print) -> list[dict]:
  """Trains the transformer on the train pairs; returns the test figures every 250 steps."""
  data = loader.load_data(config, workdir)
  num_classes = len(data.class_names)
  fixed_tr, moving_tr = label_pairs(data, "train")
  fixed_te, moving_te = label_pairs(data, "test")

  def masks(labels):
    return jax.nn.one_hot(labels, num_classes)[..., 1:]

  s = config.mmsdnet
  net = stn_lib.SpatialTransformer(features=s.stn_features, hidden=s.stn_hidden)
  params = net.init(jax.random.PRNGKey(seed), masks(moving_tr[:2]), masks(fixed_tr[:2]))
  tx = optax.adam(learning_rate)
  opt = tx.init(params)

  def loss_fn(p, moving, fixed):
    warped, _ = net.apply(p, moving, fixed)
    return 1.0 - jnp.mean(similarity.soft_dice_per_class(warped, fixed))

  @jax.jit
  def step(p, o, moving, fixed):
    loss, grads = jax.value_and_grad(loss_fn)(p, masks(moving), masks(fixed))
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  @jax.jit
  def warp_labels(p, moving, fixed):
    _, displacements = net.apply(p, masks(moving), masks(fixed))
    moved = tps.thin_plate_spline(jax.nn.one_hot(moving, num_classes), displacements)
    return jnp.argmax(moved, -1), jnp.mean(jnp.abs(displacements))

  rng = np.random.default_rng(seed)
  unwarped = mean_dice(moving_te, fixed_te, data.class_names)
  size = fixed_te.shape[1] - 1
  rows = []
  for it in range(steps + 1):
    if it % 250 == 0 or it == steps:
      moved, offset = warp_labels(params, moving_te, fixed_te)
      row = {"step": it, "unwarped": unwarped,
             "warped": mean_dice(np.asarray(moved), fixed_te, data.class_names),
             "offset_px": float(offset) * size}
      rows.append(row)
      report(f"step {it}: test label Dice unwarped {row['unwarped']:.3f}, warped "
             f"{row['warped']:.3f}, mean control-point offset {row['offset_px']:.2f} px")
    if it < steps:
      pick = rng.choice(len(fixed_tr), 8)
      params, opt, _ = step(params, opt, moving_tr[pick], fixed_tr[pick])
  return rows


def main(argv):
  del argv
  config = mmsdnet.get_config(f"misalignment={FLAGS.misalignment}")
  config.seed = FLAGS.seed
  with tempfile.TemporaryDirectory() as workdir:   # splits and normalisation only
    run(config, FLAGS.steps, FLAGS.learning_rate, FLAGS.seed, pathlib.Path(workdir))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
