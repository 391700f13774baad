"""Command line of the classical registration baselines (see `run.py`).

  python -m unpaired_seg.baselines --config=configs/multi_atlas.py --workdir=runs/multi_atlas
  python -m unpaired_seg.baselines --config=configs/register.py:tiny --workdir=/tmp/register
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/multi_atlas.py[:tiny].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for the predictions and the summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from unpaired_seg.baselines import run
  try:
    run.run(FLAGS.config, FLAGS.workdir)
  except run.USER_ERRORS as e:   # a one-line message naming the file, key or flag
    logging.error("%s", e)
    sys.exit(f"error: {e}")


def parse_flags(argv):
  """absl's parsing, with a bad flag or `--config.<key>` override reported in one line."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (KeyError, AttributeError) as e:   # ml_collections: an override names no config key
    sys.exit(f"error: --config override: no such config key ({e})")


if __name__ == "__main__":
  sys.path.insert(0, ".")  # configs/ next to the working directory
  app.run(main, flags_parser=parse_flags)
