"""The `baseline` config section: defaults, schema and the checks that span keys.

  config.baseline = section.default_section()          # in configs/<baseline>.py
  section.validate(config)                             # once, before anything runs

`validate` runs the project's config validation (every core key, with the `baseline` section
registered as a plug-in section and this package's method names as the registry), then checks
what one key's type cannot say: the modalities named exist, and copy / register get a partner
modality other than the target.
"""

import ml_collections

from unpaired_seg import config_schema
from unpaired_seg.baselines import registration

# Method name -> what it does (the registry `config_schema.validate` checks `method` against).
METHODS = {
    "copy": "the partner modality's labels of the same subject, through world coordinates",
    "register": "the partner's labels warped by MI affine + B-spline registration of its image",
    "multi_atlas": "k labelled atlases registered by MI affine + B-spline, majority vote",
}
PAIRED_METHODS = ("copy", "register")

_SEQUENCE_OF_POSITIVE = config_schema.int_tuple()

SCHEMA = {
    # The modality whose labels are transferred ('' = the other one of two) and the modality
    # segmented ('' = every configured modality).
    "source": config_schema.STRING,
    "target": config_schema.STRING,
    "atlases": config_schema.non_negative_int(),     # multi_atlas: k; 0 = every labelled one
    "init": config_schema.choice(*registration.INITS),
    "affine_iterations": config_schema.non_negative_int(),
    "bspline_iterations": config_schema.non_negative_int(),
    "mesh_size": config_schema.int_tuple(3),
    "histogram_bins": config_schema.Field((int,), lambda v: v >= 4, "an integer >= 4"),
    "sampling": config_schema.Field((int, float), lambda v: 0.0 < v <= 1.0,
                                    "a number in (0, 1]"),
    "shrink_factors": config_schema.Field(
        (tuple, list), lambda v: len(v) >= 1 and _SEQUENCE_OF_POSITIVE.check(v),
        "one or more positive integers, coarse to fine"),
    "bspline_shrink_factors": config_schema.Field(
        (tuple, list), lambda v: len(v) >= 1 and _SEQUENCE_OF_POSITIVE.check(v),
        "one or more positive integers, coarse to fine"),
    "threads": config_schema.positive_int(),
    "seed": config_schema.non_negative_int(),
}


def default_section(**overrides) -> ml_collections.ConfigDict:
  """The section with its defaults (sized for 2 mm abdominal volumes on a CPU core)."""
  values = dict(source="", target="", atlases=5, init="body_centre", affine_iterations=200,
                bspline_iterations=50, mesh_size=(6, 6, 4), histogram_bins=32, sampling=0.02,
                shrink_factors=(4, 2, 1), bspline_shrink_factors=(2, 1), threads=1, seed=0)
  unknown = sorted(set(overrides) - set(values))
  if unknown:
    raise ValueError(f"unknown baseline keys {unknown}")
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def shrink_to_tiny(section: ml_collections.ConfigDict) -> None:
  """Seconds on the tiny phantom (32 x 32 x 12 voxels)."""
  section.update(atlases=0, affine_iterations=50, bspline_iterations=5, mesh_size=(2, 2, 1),
                 histogram_bins=16, sampling=0.25, shrink_factors=(2, 1),
                 bspline_shrink_factors=(1,))


def register_config() -> None:
  """Declares the `baseline` section to `config_schema` (idempotent; `validate` calls it)."""
  config_schema.register_section("baseline", SCHEMA)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises config_schema.ConfigError naming the first bad key (see the module docstring)."""
  register_config()
  if "baseline" not in config:
    raise config_schema.ConfigError("config key 'baseline' is missing: a baseline's config needs "
                                    "the section (configs/multi_atlas.py builds it)")
  config_schema.validate(config, METHODS)
  targets(config)   # names of modalities, and the partner of copy / register


def targets(config: ml_collections.ConfigDict) -> dict[str, str]:
  """{target modality: source modality} of the run; a ConfigError names a bad key."""
  modalities = tuple(config.data.modalities)
  b = config.baseline
  for key in ("source", "target"):
    if b[key] and b[key] not in modalities:
      raise config_schema.ConfigError(
          f"config key 'baseline.{key}': {b[key]!r} is not one of data.modalities {modalities}")
  wanted = (b.target,) if b.target else modalities
  out = {}
  for target in wanted:
    if b.source:
      source = b.source
    else:
      others = [m for m in modalities if m != target]
      if len(others) != 1:
        raise config_schema.ConfigError(
            f"config key 'baseline.source' must name the modality whose labels are transferred "
            f"when data.modalities has {len(modalities)} modalities {modalities}")
      source = others[0]
    if source == target and config.method in PAIRED_METHODS:
      raise config_schema.ConfigError(
          f"config key 'baseline.source': {config.method!r} transfers labels from another "
          f"modality of the same subject; source and target are both {target!r}")
    out[target] = source
  return out

