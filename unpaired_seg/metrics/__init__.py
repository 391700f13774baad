r"""Segmentation metrics in millimetres: Dice, Hausdorff, HD95, ASSD, surface Dice, per-slice Dice.

Pure numpy/scipy, no JAX and no Flax: evaluation runs on the host on whole 3D volumes in their
original geometry, after the slice-wise predictions have been re-stacked.

Conventions, recorded by `metric_settings()` and written into `summary.json`:

* Surfaces: a surface voxel is a mask voxel with at least one face neighbour outside the mask, i.e.
  the mask minus its `scipy.ndimage.binary_erosion` with the face-connectivity structure
  `generate_binary_structure(ndim, 1)` (MedPy's `connectivity=1`). Voxels on the array border count
  as surface (the outside of the array is background).
* Distances: Euclidean, in mm, between voxel centres, from `distance_transform_edt(~surface,
  sampling=spacing)`.
* HD95: by default the larger of the two directed 95th percentiles (`"max_directed"`); MedPy 0.5's
  percentile of both directions pooled is available as `"pooled"`. Percentiles interpolate linearly
  (`np.percentile`'s default).
* ASSD: by default the mean of the two directed mean distances (`"mean_of_directed_means"`); the
  mean over both directions pooled (MedPy 0.5's `assd`) is available as `"pooled"`.
* Surface Dice: surface voxels are counted, not weighted by surfel area.
* Empty masks: see `EMPTY_POLICY`.

The package: `checks` (errors and input checks), `binary` (the metrics of one pair of masks),
`volume` (label volumes, the aggregate over cases, the settings record and JSON). Import the names
from here: `from unpaired_seg import metrics`.

Example (prints 5.0: a cube shifted by two voxels of 2.5 mm):
  python -c "import numpy as np; from unpaired_seg import metrics as m; \
    a = np.zeros((9, 9, 9), bool); a[2:6, 2:6, 2:6] = True; \
    print(m.hd95(a, np.roll(a, 2, axis=2), spacing=(1.0, 1.0, 2.5)))"
"""

from unpaired_seg.metrics.binary import (ASSD_VARIANTS, HD95_VARIANTS, METRIC_NAMES, assd, dice,
                                         hausdorff, hd95, per_slice_dice, surface_dice,
                                         surface_distances)
from unpaired_seg.metrics.checks import EmptyMaskError, MetricInputError
from unpaired_seg.metrics.volume import (EMPTY_POLICY, aggregate, evaluate_volume, metric_settings,
                                         to_jsonable)

__all__ = [
    "ASSD_VARIANTS", "EMPTY_POLICY", "EmptyMaskError", "HD95_VARIANTS", "METRIC_NAMES",
    "MetricInputError", "aggregate", "assd", "dice", "evaluate_volume", "hausdorff", "hd95",
    "metric_settings", "per_slice_dice", "surface_dice", "surface_distances", "to_jsonable",
]
