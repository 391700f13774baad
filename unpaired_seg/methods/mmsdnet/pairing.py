"""Pairs of slices across two modalities for MMSDNet/DAFNet, on the host, a function of the step.

Every sampled slice (case c, slice z) of modality j gets k candidate slices of the other modality i:
  expert         k = 1: the same subject, the same slice index (a paired dataset, e.g. the phantom
                 with data.phantom.mode='paired');
  random         k = 1: the same subject, the slice shifted by up to `window` (ablation);
  auto           k candidates of the same subject within +- `window` slices: the expert slice and
                 k - 1 others drawn at random, in a random order; the pair-weighting network
                 weights them;
  cross_subject  k candidates from OTHER subjects of modality i (unpaired data: real CT and MR of
                 different people), each at the same relative position z / (Z - 1) along the body
                 axis; the pair-weighting network weights them.

  batch = host_batch(data, step, pairing='auto', k=3, window=2, seed=0)
  batch['mr']['partner_image']   # [B, k, H, W, C] CT candidates of the MR slices

  python -m pytest -q tests/methods/test_mmsdnet.py -k pairing
"""

from collections.abc import Sequence

import numpy as np

from unpaired_seg.config_schema import ConfigError
from unpaired_seg.data import pipeline

PAIRINGS = ("expert", "auto", "random", "cross_subject")
_STREAM = 11  # keeps the pairing draws apart from the samplers' streams


def num_candidates(pairing: str, k: int) -> int:
  """Candidates per slice: 1 for 'expert' and 'random', `k` for 'auto' and 'cross_subject'."""
  if pairing not in PAIRINGS:
    raise ConfigError(f"config key 'mmsdnet.pairing': {pairing!r} is not one of {PAIRINGS}")
  return 1 if pairing in ("expert", "random") else int(k)


def relative_slice(z: int, num: int, partner_num: int) -> int:
  """The slice of a `partner_num`-slice volume at z's relative position z / (num - 1)."""
  if num <= 1 or partner_num <= 1:
    return 0
  return int(round(z * (partner_num - 1) / (num - 1)))


def _by_subject(cases: Sequence) -> dict[str, int]:
  return {c.subject: n for n, c in enumerate(cases)}


def _same_subject(case, partners: dict[str, int], modality: str) -> int:
  if case.subject not in partners:
    raise ConfigError(f"config key 'mmsdnet.pairing': subject {case.subject!r} of "
                      f"{case.modality}/{case.case} has no volume of modality {modality!r} in the "
                      "same split; use pairing='cross_subject' for unpaired data")
  return partners[case.subject]


def candidates(pairing: str, k: int, window: int, case, case_pos: int, z: int,
               partner_cases: Sequence, partner_index: dict[str, int], partner_modality: str,
               rng: np.random.Generator | None) -> list[tuple[int, int]]:
  """k (partner case index, partner slice) candidates of slice z of `case`.

  With `rng=None` the choice is deterministic (inference): 'random' keeps the expert slice, 'auto'
  takes the nearest slices around it (z, z - 1, z + 1, z - 2, ...), 'cross_subject' the next k
  partner cases after position `case_pos`.
  """
  if pairing == "cross_subject":
    # Other subjects only (all of them in unpaired data); the same subject if none is left.
    pool = [n for n, c in enumerate(partner_cases) if c.subject != case.subject]
    pool = pool or list(range(len(partner_cases)))
    if rng is None:
      picks = [pool[(case_pos + t) % len(pool)] for t in range(k)]
    else:
      picks = [pool[n] for n in rng.choice(len(pool), size=k, replace=len(pool) < k)]
    return [(int(p), relative_slice(z, case.num_slices, partner_cases[p].num_slices))
            for p in picks]
  p = _same_subject(case, partner_index, partner_modality)
  last = partner_cases[p].num_slices - 1
  expert = min(z, last)
  if pairing == "expert" or (pairing == "random" and rng is None):
    return [(p, expert)]
  if pairing == "random":
    return [(p, int(np.clip(expert + rng.integers(-window, window + 1), 0, last)))]
  # auto: the expert slice and k - 1 others within the window (clipped at the volume's ends).
  offsets = [o for d in range(1, window + 1) for o in (-d, d)]
  others = [int(np.clip(expert + o, 0, last)) for o in offsets]
  if rng is None:
    chosen = [expert] + others[:k - 1]
  else:
    picks = rng.choice(len(others), size=k - 1, replace=len(others) < k - 1) if k > 1 else []
    chosen = [expert] + [others[i] for i in picks]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]  # no position bias for the net
  chosen += [expert] * (k - len(chosen))  # a window smaller than k repeats the expert slice
  return [(p, s) for s in chosen[:k]]


def host_batch(data, step: int, *, pairing: str, k: int, window: int, seed: int,
               rows: slice | None = None) -> dict:
  """The global batch of `step`: each modality's sampled slices plus their partner candidates.

  Args:
    data: `train.Data` with exactly two modalities.
    step: training step; the result is a pure function of (seed, step).
    pairing: one of PAIRINGS.
    k: candidates per slice (from `num_candidates`).
    window: +- slices of 'auto' and 'random'.
    seed: run seed.
    rows: the part of the global batch to build (a process's rows), None for all of it; the
      partners of every row are drawn, so that the rows built do not depend on the split.

  Returns:
    {modality: {'image' [B, H, W, C], 'label' [B, H, W], 'labelled' [B], 'case_index' [B],
    'slice_index' [B], 'partner_image' [B, k, H, W, C], 'partner_case' [B, k],
    'partner_slice' [B, k]}}; partner indices refer to data.cases['train'][other modality].
  """
  modalities = tuple(data.modalities)
  if len(modalities) != 2:
    raise ConfigError(f"config key 'data.modalities': pairing needs exactly two, got {modalities}")
  if pairing != "cross_subject" and not data.manifest.paired:
    raise ConfigError(f"config key 'mmsdnet.pairing': {pairing!r} needs a paired dataset (the "
                      f"same subjects in every modality, e.g. data.phantom.mode='paired'); "
                      f"{data.manifest.name} is unpaired: use pairing='cross_subject'")
  out = {}
  for index, j in enumerate(modalities):
    i = modalities[1 - index]
    sampler = data.samplers[j]
    b = sampler.batch(step, rows)
    cases = data.cases["train"][j]
    partners = data.cases["train"][i]
    partner_index = _by_subject(partners)
    rng = np.random.default_rng([seed, _STREAM, step, index])
    drawn = [candidates(pairing, k, window, cases[int(ci)], int(ci), int(z), partners,
                        partner_index, i, rng) for ci, z in sampler.indices(step)]
    pc, ps, images = [], [], []
    for row in (drawn if rows is None else drawn[rows]):
      pc.append([c for c, _ in row])
      ps.append([s for _, s in row])
      images.append(np.stack([pipeline.slice_stack(partners[c].image, np.array([s]),
                                                   sampler.context)[0] for c, s in row]))
    out[j] = {"image": b["image"], "label": b["label"], "labelled": b["labelled"],
              "case_index": b["case_index"], "slice_index": b["slice_index"],
              "partner_image": np.stack(images).astype(np.float32),
              "partner_case": np.asarray(pc, np.int32), "partner_slice": np.asarray(ps, np.int32)}
  return out
