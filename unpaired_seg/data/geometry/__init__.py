"""Volume geometry: canonical orientation, in-plane resampling, body crop, and the way back.

A case goes from its source grid to the grid the model sees in two steps, and the
`GeometryRecord` written beside it holds everything needed to undo both exactly:

  1. Reorientation to canonical RAS (array axes point to +Right, +Anterior, +Superior): a pure
     permutation and flip of the voxels, no interpolation, so it is undone exactly. After it the
     slice axis of an axial acquisition is the LAST axis ([X, Y, Z], Z inferior -> superior).
  2. In-plane resampling of axes 0 and 1 to a target spacing; the slice axis is kept. The new grid
     has EXACTLY the target spacing, `round(n * spacing / target)` voxels, and the same centre as
     the old one (so the field of view changes by less than one voxel). Images are interpolated
     linearly (order 1: fast, no overshoot), labels by nearest neighbour (order 0); outside the
     source grid the nearest edge voxel is repeated.

Going back (`to_source_grid`) resamples a label map from the model grid onto the canonical grid
by nearest neighbour, then undoes the reorientation: the result has the source's exact shape and
is written with the source's affine.

A source whose affine contradicts the anatomy along a voxel axis (the BTCV CT files put the back
of the body in front) is corrected before step 1 by `reverse_axis_directions`: only the affine
changes, never the voxels, so the way back still lands on the source file's own voxel grid.

  python -c "import numpy as np; from unpaired_seg.data import geometry as g; \
lab = np.zeros((40, 30, 5), np.uint8); lab[10:30, 5:25] = 1; \
aff = np.diag([-1.25, -1.25, 7.7, 1]); \
im, lb, af, rec = g.to_model_grid(lab.astype(float), lab, aff, (2.0, 2.0)); \
print(lb.shape, np.diag(af), (g.to_source_grid(lb, rec) == lab).mean())"

The package: `record` (the GeometryRecord, GeometryError and the array and affine checks),
`orientation` (step 1 and its inverse), `model_grid` (step 2 and the whole way there and back) and
`crop` (the in-plane body crop the input pipeline applies on the model grid). Import the names
from here: `from unpaired_seg.data import geometry`.

Nothing here imports JAX or Flax: numpy, scipy and nibabel only.
"""

from unpaired_seg.data.geometry.crop import apply_box, body_crop_box, invert_box, otsu_threshold
from unpaired_seg.data.geometry.model_grid import resample_inplane, to_model_grid, to_source_grid
from unpaired_seg.data.geometry.orientation import (check_axes, from_canonical,
                                                    reverse_axis_directions, to_canonical)
from unpaired_seg.data.geometry.record import GeometryError, GeometryRecord, spacing_of

__all__ = [
    "GeometryError", "GeometryRecord", "apply_box", "body_crop_box", "check_axes",
    "from_canonical", "invert_box", "otsu_threshold", "resample_inplane", "reverse_axis_directions",
    "spacing_of", "to_canonical", "to_model_grid", "to_source_grid",
]
