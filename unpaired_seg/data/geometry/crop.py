"""Body crop: an in-plane box of a fixed size centred on the body, cut out and put back.

The body is found by Otsu's threshold of the mean over slices; a box that reaches outside the
image is padded when cut (`apply_box`) and its padding dropped when put back (`invert_box`).
"""

import math
from collections.abc import Sequence

import numpy as np

from unpaired_seg.data.geometry.record import GeometryError


def otsu_threshold(values, bins: int = 256) -> float:
  """Otsu's threshold: the histogram cut that maximises the between-class variance.

  Args:
    values: intensities, any shape; NaN/inf are ignored.
    bins: histogram bins over [min, max].

  Returns:
    A threshold t; foreground is `values > t`. For a constant input, that constant.
  """
  values = np.asarray(values, dtype=np.float64).ravel()
  values = values[np.isfinite(values)]
  if values.size == 0:
    raise GeometryError("argument 'values' holds no finite intensity")
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return lo
  counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
  centres = 0.5 * (edges[:-1] + edges[1:])
  weight_low = np.cumsum(counts)[:-1].astype(np.float64)          # classes: bins [0, k] vs (k, ...]
  weight_high = counts.sum() - weight_low
  sum_low = np.cumsum(counts * centres)[:-1]
  mean_low = sum_low / np.maximum(weight_low, 1)
  mean_high = (np.sum(counts * centres) - sum_low) / np.maximum(weight_high, 1)
  between = weight_low * weight_high * (mean_low - mean_high) ** 2
  return float(edges[int(np.argmax(between)) + 1])


def body_crop_box(image, size: Sequence[int], *, threshold: float | None = None
                  ) -> tuple[slice, slice]:
  """An in-plane box of `size` centred on the body.

  The body is the set of in-plane pixels whose mean over slices is above `threshold` (default:
  Otsu's threshold of that mean image; averaging over slices removes most background noise). Its
  extent along each axis runs from the 0.5th to the 99.5th percentile of those pixels'
  coordinates, so that a few stray bright pixels do not stretch it; the box is centred there
  (on the image centre when no pixel is above the threshold).

  Clipping: along an axis where the image is at least `size` long the box is shifted to lie
  inside the image (no padding, the body as centred as the borders allow). Where the image is
  shorter than `size` the box covers the whole axis and reaches outside it (negative start or
  stop past the end); `apply_box` pads there.

  Args:
    image: [H, W] or [H, W, Z].
    size: (h, w) of the box.
    threshold: intensity above which a pixel counts as body.

  Returns:
    (slice over axis 0, slice over axis 1), each with step None and length `size`.
  """
  image = np.asarray(image)
  if image.ndim not in (2, 3):
    raise GeometryError(f"argument 'image' must be [H, W] or [H, W, Z], got shape {image.shape}")
  size = _box_size(size)
  mean = image.astype(np.float64).reshape(image.shape[0], image.shape[1], -1).mean(axis=-1)
  if threshold is None:
    threshold = otsu_threshold(mean)
  rows, cols = np.nonzero(mean > threshold)
  box = []
  for axis, coords in enumerate((rows, cols)):
    n, want = image.shape[axis], size[axis]
    if coords.size:
      first, last = np.percentile(coords, [0.5, 99.5])
      centre = 0.5 * (first + last)
    else:
      centre = 0.5 * (n - 1)
    # The box [start, start + want) has its centre at start + (want - 1) / 2; round half up.
    start = int(math.floor(centre - (want - 1) / 2.0 + 0.5))
    start = min(max(start, 0), n - want) if want <= n else min(max(start, n - want), 0)
    box.append(slice(start, start + want))
  return tuple(box)


def _box_size(size) -> tuple[int, int]:
  size = tuple(size)
  if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
    raise GeometryError(f"argument 'size' must be two positive integers (h, w), got {size!r}")
  return int(size[0]), int(size[1])


def _check_box(box, size=None) -> tuple[slice, slice]:
  if len(box) != 2 or not all(isinstance(b, slice) and b.step in (None, 1)
                              and b.start is not None and b.stop is not None for b in box):
    raise GeometryError(f"argument 'box' must be two slices with start and stop, got {box!r}")
  if size is not None and tuple(b.stop - b.start for b in box) != tuple(size):
    raise GeometryError(f"argument 'box' {box} does not have argument 'size' {tuple(size)}")
  return tuple(box)


def _overlap(box, shape):
  """Per axis: (source slice in the full array, destination slice in the box array)."""
  parts = []
  for b, n in zip(box, shape):
    lo, hi = max(b.start, 0), min(b.stop, n)
    if hi <= lo:
      return None
    parts.append((slice(lo, hi), slice(lo - b.start, hi - b.start)))
  return parts


def apply_box(array, box: tuple[slice, slice], size: Sequence[int],
              pad_value: float = 0.0) -> np.ndarray:
  """Cuts `box` out of the first two axes of [H, W, ...], padding with `pad_value` outside.

  Args:
    array: [H, W, ...].
    box: from `body_crop_box` (may reach outside the array).
    size: (h, w), the box's size (checked against `box`).
    pad_value: value of box pixels outside the array.

  Returns:
    [h, w, ...] with `array`'s dtype.
  """
  array = np.asarray(array)
  size = _box_size(size)
  box = _check_box(box, size)
  out = np.full(size + array.shape[2:], pad_value, dtype=array.dtype)
  parts = _overlap(box, array.shape[:2])
  if parts is not None:
    (src0, dst0), (src1, dst1) = parts
    out[dst0, dst1] = array[src0, src1]
  return out


def invert_box(array_in_box, box: tuple[slice, slice], full_shape: Sequence[int],
               fill_value: float = 0) -> np.ndarray:
  """Puts a box cut by `apply_box` back into an array of `full_shape` (first two axes).

  Args:
    array_in_box: [h, w, ...].
    box: the box it was cut with.
    full_shape: (H, W) or the full shape; trailing axes come from `array_in_box`.
    fill_value: value outside the box (0 = background for labels).

  Returns:
    [H, W, ...] with `array_in_box`'s dtype; the box's padded part is dropped.
  """
  array_in_box = np.asarray(array_in_box)
  box = _check_box(box, array_in_box.shape[:2])
  full = tuple(int(n) for n in full_shape[:2])
  out = np.full(full + array_in_box.shape[2:], fill_value, dtype=array_in_box.dtype)
  parts = _overlap(box, full)
  if parts is not None:
    (dst0, src0), (dst1, src1) = parts
    out[dst0, dst1] = array_in_box[src0, src1]
  return out
