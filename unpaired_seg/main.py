"""Entry point: train (resuming if the workdir has a checkpoint) or evaluate.

  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint
  python -m unpaired_seg.main --config=configs/joint.py:tiny --config.train.steps=20 --workdir=/tmp/j
  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint --mode=evaluate
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/joint.py[:tiny].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "Train (then evaluate) or only evaluate.")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods, multi-node).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so XLA flags in the environment apply
  if FLAGS.multihost:
    jax.distributed.initialize()
  from unpaired_seg import train
  logging.info("process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
               jax.local_device_count())
  train.main_entry(FLAGS.config, FLAGS.workdir, FLAGS.mode)


if __name__ == "__main__":
  sys.path.insert(0, ".")  # configs/ next to the working directory
  app.run(main)
