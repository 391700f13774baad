"""The phantom's anatomy (see phantom.py): tissue classes, shapes drawn per subject and evaluated
at any coordinates, and the paired mode's warp of those coordinates."""

import numpy as np

# Tissue classes of the anatomy model.
AIR, FAT, MUSCLE, BONE, LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, STOMACH = range(9)
_NUM_TISSUES = 9
_ORGANS = (LIVER, SPLEEN, KIDNEY_R, KIDNEY_L, STOMACH)


def _rotation(rng, in_plane_deg, tilt_deg=8.0) -> np.ndarray:
  """A rotation: mostly about z (in-plane), slightly tilted out of plane. [3, 3]"""
  a, b = np.deg2rad(rng.uniform(-tilt_deg, tilt_deg, 2))
  c = np.deg2rad(in_plane_deg)
  rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
  ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
  rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
  return rz @ ry @ rx


def _waves(rng, count, freq, amplitude, dims=3, z_scale=1.0):
  """Random plane waves for a smooth field sum_k amp_k * sin(w_k . p + phase_k).

  Returns:
    (wave vectors [K, 3], phases [K], amplitudes [K, dims]).
  """
  directions = rng.normal(size=(count, 3))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  vectors = directions * rng.uniform(*freq, size=(count, 1))
  vectors[:, 2] *= z_scale
  phases = rng.uniform(0, 2 * np.pi, count)
  amplitudes = rng.uniform(-amplitude, amplitude, size=(count, dims))
  return vectors.astype(np.float32), phases.astype(np.float32), amplitudes.astype(np.float32)


def _wave_field(points, waves) -> list[np.ndarray]:
  """Evaluates a `_waves` field at points (x, y, z), each [N].

  Elementwise on purpose: a BLAS product with an inner dimension of 3 is slower here and its
  summation order may depend on threading, while the phantom must be byte-reproducible.

  Returns:
    one [N] array per field component (dims of them).
  """
  x, y, z = points
  vectors, phases, amplitudes = waves
  out = [np.zeros_like(x) for _ in range(amplitudes.shape[1])]
  for (wx, wy, wz), phase, amps in zip(vectors, phases, amplitudes):
    wave = np.sin(wx * x + wy * y + wz * z + phase)
    for component, amp in zip(out, amps):
      component += amp * wave
  return out


def _organ(rng, tissue, center_ranges, radius_ranges, angle_range):
  center = np.array([rng.uniform(*r) for r in center_ranges], np.float32)
  radii = np.array([rng.uniform(*r) for r in radius_ranges], np.float32)
  return {"tissue": tissue, "center": center, "radii": radii,
          "rotation": _rotation(rng, rng.uniform(*angle_range)).astype(np.float32),
          # Deformation in the organ's own unit-sphere coordinates, so relative to its size.
          "warp": _waves(rng, 3, (1.5, 3.0), 0.09)}


def _sample_anatomy(rng: np.random.Generator) -> dict:
  """Draws one subject's anatomy (normalised coordinates, see the module docstring)."""
  # Where the subject lies in the field of view and how large it is: applied to everything.
  placement = {
      "shift": np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05),
                         rng.uniform(-0.04, 0.04)], np.float32),
      "scale": np.array([rng.uniform(0.9, 1.08)] * 2 + [rng.uniform(0.92, 1.08)], np.float32),
  }
  body = {
      "center": np.array([0.0, rng.uniform(-0.03, 0.03)], np.float32),
      "semi": np.array([rng.uniform(0.74, 0.86), rng.uniform(0.58, 0.7)], np.float32),
      # Boundary bumps: radius factor 1 + sum_k c_k cos(k theta + phi_k), k = 2, 3, 4.
      "harmonics": rng.uniform(-0.03, 0.03, 3).astype(np.float32),
      "harmonic_phases": rng.uniform(0, 2 * np.pi, 3).astype(np.float32),
      "z_amplitude": np.float32(rng.uniform(0.0, 0.05)),
      "z_phase": np.float32(rng.uniform(0, 2 * np.pi)),
      "fat": np.float32(rng.uniform(0.07, 0.14)),
      "wall": np.float32(rng.uniform(0.03, 0.05)),
  }
  spine = {"y": np.float32(rng.uniform(-0.4, -0.33)), "radius": np.float32(rng.uniform(0.09, 0.12))}
  k_r = rng.uniform(15, 35)
  organs = [
      # Painted in this order: later organs win where shapes overlap, kidneys last.
      _organ(rng, LIVER, [(0.26, 0.38), (-0.04, 0.1), (0.08, 0.18)],
             [(0.3, 0.38), (0.36, 0.44), (0.36, 0.44)], (-15, 15)),
      _organ(rng, STOMACH, [(-0.32, -0.2), (0.22, 0.34), (0.2, 0.35)],
             [(0.13, 0.19), (0.1, 0.14), (0.2, 0.3)], (-30, 30)),
      _organ(rng, SPLEEN, [(-0.56, -0.46), (-0.18, -0.02), (0.15, 0.3)],
             [(0.11, 0.15), (0.18, 0.24), (0.3, 0.38)], (-40, -20)),
      _organ(rng, KIDNEY_R, [(0.27, 0.36), (-0.32, -0.2), (-0.25, -0.08)],
             [(0.09, 0.12), (0.13, 0.17), (0.32, 0.4)], (k_r - 5, k_r + 5)),
      _organ(rng, KIDNEY_L, [(-0.36, -0.27), (-0.32, -0.2), (-0.2, -0.03)],
             [(0.09, 0.12), (0.13, 0.17), (0.32, 0.4)], (-k_r - 5, -k_r + 5)),
  ]
  # Visceral fat: where a higher-frequency field exceeds a threshold (about a fifth of the
  # free cavity). Unit variance: K waves of amplitude sqrt(2 / K).
  count = 8
  visceral = _waves(rng, count, (10.0, 18.0), 1.0, dims=1, z_scale=0.3)
  visceral = (visceral[0], visceral[1], np.full((count, 1), np.sqrt(2 / count), np.float32))
  return {"placement": placement, "body": body, "spine": spine, "organs": organs,
          "visceral": visceral,
          "visceral_threshold": np.float32(rng.uniform(0.8, 1.0))}


# Organs are clipped to |z| <= this (anatomical coordinate), so that end slices stay organ-free
# even after a one-slice offset with phantom.MIN_SLICES slices.
_ORGAN_Z_LIMIT = 0.65


def _tissue_map(anatomy: dict, points) -> np.ndarray:
  """Tissue class at each point.

  Args:
    anatomy: from `_sample_anatomy`.
    points: normalised coordinates (x, y, z), each float32 [N].

  Returns:
    int8 [N] tissue classes.
  """
  shift, scale = anatomy["placement"]["shift"], anatomy["placement"]["scale"]
  points = tuple((p - shift[i]) / scale[i] for i, p in enumerate(points))
  x, y, z = points
  body = anatomy["body"]
  scale = 1 + body["z_amplitude"] * np.sin(2.0 * z + body["z_phase"])
  dx = (x - body["center"][0]) / (body["semi"][0] * scale)
  dy = (y - body["center"][1]) / (body["semi"][1] * scale)
  radius = np.sqrt(dx * dx + dy * dy)
  theta = np.arctan2(dy, dx)
  boundary = np.ones_like(radius)
  for k, (c, phi) in enumerate(zip(body["harmonics"], body["harmonic_phases"]), start=2):
    boundary += c * np.cos(k * theta + phi)
  cavity_edge = boundary * (1 - body["fat"])
  cavity = radius < cavity_edge
  inner = radius < cavity_edge - body["wall"]

  tissue = np.zeros(x.shape, np.int8)
  tissue[radius < boundary] = FAT
  tissue[cavity] = MUSCLE
  at = np.nonzero(inner)[0]
  field = _wave_field((x[at], y[at], z[at]), anatomy["visceral"])[0]
  tissue[at[field > anatomy["visceral_threshold"]]] = FAT

  spine = anatomy["spine"]
  sy, sr = spine["y"], spine["radius"]
  for cx, cy, ax, ay in ((0.17, sy - 0.1, 0.1, 0.07), (-0.17, sy - 0.1, 0.1, 0.07)):
    tissue[cavity & (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1)] = MUSCLE
  vertebra = (x / sr) ** 2 + ((y - sy) / sr) ** 2 < 1
  process = (x / (0.35 * sr)) ** 2 + ((y - sy + 1.6 * sr) / (0.8 * sr)) ** 2 < 1
  tissue[cavity & (vertebra | process)] = BONE

  allowed = inner & (np.abs(z) <= _ORGAN_Z_LIMIT)
  for organ in anatomy["organs"]:
    center, radii = organ["center"], organ["radii"]
    # Cheap pre-selection: the deformed organ stays within 1.5 max radii of its centre.
    reach = 1.5 * float(radii.max())
    near = np.nonzero(allowed & (np.abs(x - center[0]) < reach) & (np.abs(y - center[1]) < reach)
                      & (np.abs(z - center[2]) < reach))[0]
    if near.size == 0:
      continue
    offsets = (x[near] - center[0], y[near] - center[1], z[near] - center[2])
    rotation = organ["rotation"]
    # Unit-sphere coordinates of the organ: rotate into its axes, divide by its radii.
    local = [sum(offsets[i] * rotation[i, j] for i in range(3)) / radii[j] for j in range(3)]
    local = [u + d for u, d in zip(local, _wave_field(local, organ["warp"]))]
    lx, ly, lz = local
    inside = lx * lx + ly * ly + lz * lz < 1
    if organ["tissue"] in (KIDNEY_R, KIDNEY_L):
      # The renal hilum: a notch on the medial side makes the bean shape.
      medial = -0.95 if organ["tissue"] == KIDNEY_R else 0.95
      inside &= (lx - medial) ** 2 + ly ** 2 + (lz / 1.5) ** 2 >= 0.3 ** 2
    tissue[near[inside]] = organ["tissue"]
  return tissue


def _grid_points(shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Normalised coordinates (x, y, z) of the voxel centres, each [X*Y*Z] in C order of [X, Y, Z]."""
  axes = [((np.arange(n, dtype=np.float32) + 0.5) / n) * 2 - 1 for n in shape]
  return tuple(g.ravel() for g in np.meshgrid(*axes, indexing="ij"))


def _warp_points(points, shape, rng: np.random.Generator, misalignment: float = 1.0):
  """Paired mode: a smooth in-plane deformation of a few voxels plus a -1..+1 slice offset."""
  x, y, z = points
  # About 2 voxels at 64 in-plane voxels at the peak (times `misalignment`), proportionally more
  # on finer grids. The same random draws at every `misalignment`: only the amplitude changes.
  dx, dy = _wave_field(points, _waves(rng, 3, (1.0, 2.5), 0.025, dims=2))
  if misalignment != 1:
    dx, dy = dx * np.float32(misalignment), dy * np.float32(misalignment)
  offset = int(rng.integers(-1, 2))
  return x + dx, y + dy, z + np.float32(offset * 2.0 / shape[2])
