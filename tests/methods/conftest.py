"""The tiny DAFNet config and paired phantom that the MMSDNet tests share (built once per session).

SWA from step 2 and the transformer held at the identity for the first 3 steps, so that the
first few steps of one compiled step cover both starts; anatomy U-Nets of depth 1, whose steps
compile faster than the tiny config's depth 2 (no test needs a deeper one).
"""

import types

import pytest

from configs import dafnet
from unpaired_seg.data import loader


@pytest.fixture(scope="session")
def mmsdnet_phantom(tmp_path_factory):
  config = dafnet.get_config("tiny")
  config.data.root = str(tmp_path_factory.mktemp("phantom") / "paired")
  config.mmsdnet.anatomy_depth = config.model.depth = 1
  config.mmsdnet.swa_start = 2
  config.mmsdnet.transformer.start = 3
  config.mmsdnet.learning_rate.update(generator=3e-3, mask_disc=3e-3, image_disc=3e-3)
  data = loader.load_data(config, tmp_path_factory.mktemp("work"))
  return types.SimpleNamespace(config=config, data=data)
