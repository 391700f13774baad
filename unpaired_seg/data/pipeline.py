"""From volumes on disk to batches of 2D slices: normalise, cut around the body, split, sample.

The names of the data layer's parts, in one place: `normalization`, `splits`, `cases`, `sampler`
and `jsonio` hold the code.

  manifest = dataset.load_manifest(root)
  splits = load_or_create_splits(workdir / 'splits.json', manifest, ('mr', 'ct'),
                                 {'train': 0.6, 'val': 0.2, 'test': 0.2}, seed=0)
  volumes = dataset.load_modality(manifest, 'ct')
  norm = load_or_fit_normalization(workdir / 'normalization.json',
                                   {'ct': {'scheme': 'dataset_zscore'}},
                                   {'ct': cases_in(volumes, splits, 'train')})
  cases = prepare_cases(volumes, norm['ct'], (64, 64), manifest=manifest)
  sampler = SliceSampler(cases_in(cases, splits, 'train'), batch_size=16, foreground_fraction=0.5,
                         context_slices=0, seed=0, stream=0)
  batch = sampler.batch(step)   # {'image': [B, H, W, C], 'label': [B, H, W], ...}, pure in step

Every volume is put on the model grid and normalised, and its training view is cut around the
body (`cases`), keeping the way back to the stored and the source file.

Intensity schemes and their statistics fitted on the training split: `normalization`.

The sampler is a pure function of (seed, stream, step), so a resumed run draws exactly the batches
an uninterrupted one would, with no sampler state to checkpoint.
"""

# Re-exported: the trainer, the methods, evaluation and predict import these from `pipeline`.
from unpaired_seg.data.cases import (  # noqa: F401
    CROP_MODES, PreparedCase, SourceGeometry, centre_box, model_info, prepare_case, prepare_cases,
    target_spacing_of, view_coverage)
from unpaired_seg.data.jsonio import write_json_atomic, write_text_atomic  # noqa: F401
from unpaired_seg.data.normalization import (  # noqa: F401
    FITTED_SCHEMES, FOREGROUND_PERCENTILES, NORMALIZATION_SCHEMES, NormalizationError,
    fit_normalization, load_or_fit_normalization, normalize_intensity, parse_scheme,
    resolve_normalization)
from unpaired_seg.data.sampler import SliceSampler, _classes_per_slice, slice_stack  # noqa: F401
from unpaired_seg.data.splits import (  # noqa: F401
    SplitError, cases_in, check_no_leakage, check_split_sizes, load_or_create_splits,
    make_splits, subjects_of)
