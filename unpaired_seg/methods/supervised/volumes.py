"""The supervised methods on a 3D network (`model.ndim = 3`): patch batches, sliding windows.

  python -m unpaired_seg.main --config=configs/ummkd_3d.py:tiny --workdir=/tmp/ummkd_3d
"""

import ml_collections

from unpaired_seg.methods.supervised.method import Supervised


class PatchSupervised(Supervised):
  """The same method on a 3D network (`model.ndim = 3`): 3D patches in, sliding window out.

  Training batches are patches of data.image_size x `train.patch_slices` drawn by
  `data.patches.PatchSampler` (a pure function of the step); evaluation predicts each volume
  from overlapping windows of that one shape (`predict_volume`, used by the trainer in place of
  slice-by-slice prediction).
  """

  def __init__(self, config: ml_collections.ConfigDict, *args, **kwargs):
    super().__init__(config, *args, **kwargs)
    self.patch_shape = tuple(config.data.image_size) + (config.train.patch_slices,)
    self._samplers = None

  def host_batch(self, data, step: int, rows: slice | None = None) -> dict:
    from unpaired_seg.data import patches  # host-side data code, only for 3D
    if self._samplers is None:
      c = self.config
      self._samplers = {
          m: patches.PatchSampler(data.cases["train"][m], c.train.batch_size, self.patch_shape,
                                  c.data.foreground_fraction, seed=c.seed, stream=i,
                                  oversample=c.data.oversample)
          for i, m in enumerate(data.modalities)}
    return {m: s.batch(step, rows) for m, s in self._samplers.items()}

  def predict_volume(self, predict, state, modality: str, image, *, tile_size=None,
                     context_slices: int = 0, batch_size: int = 2, overlap: float = 0.5):
    """[X, Y, Z] labels; the trainer's slice arguments (tile_size, context_slices) are unused."""
    from unpaired_seg.data import patches
    del tile_size, context_slices
    return patches.predict_volume_patches(predict, state, modality, image,
                                          patch_shape=self.patch_shape,
                                          batch_size=max(1, min(batch_size, 2)), overlap=overlap)
