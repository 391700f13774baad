"""Method plug-ins, keyed by `config.method`. See `base.py` for what a method provides.

  method = methods.create(config, num_classes=5, modalities=('mr', 'ct'))

A plug-in with a config section of its own declares it in `register_config_sections`, which
`config_schema.validate` calls: importing a plug-in registers nothing.
"""

from collections.abc import Sequence

import ml_collections

from unpaired_seg.methods import mmsdnet, supervised

REGISTRY = {
    "individual": supervised.individual,
    "joint": supervised.joint,
    "mmsdnet": mmsdnet.mmsdnet,
    "dafnet": mmsdnet.dafnet,
    "joint_kd": supervised.joint_kd,
    "y_shaped": supervised.y_shaped,
    "x_shaped": supervised.x_shaped,
    "dualstream": supervised.dualstream,
    "chilopod": supervised.chilopod,
    "ummkd": supervised.ummkd,
    "affinity": supervised.affinity,
    "csa": supervised.csa,
}


def register_config_sections() -> None:
  """Declares each plug-in's own config section to `config_schema` (idempotent)."""
  mmsdnet.register_config()


def create(config: ml_collections.ConfigDict, num_classes: int, modalities: Sequence[str],
           num_data_shards: int = 1):
  """Builds the method that `config.method` names."""
  if config.method not in REGISTRY:
    raise ValueError(f"config key 'method': {config.method!r} is not one of {sorted(REGISTRY)}")
  return REGISTRY[config.method](config, num_classes=num_classes, modalities=modalities,
                                 num_data_shards=num_data_shards)
