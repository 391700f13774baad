"""Entry point: train (resuming if the workdir has a checkpoint) or evaluate.

  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint
  python -m unpaired_seg.main --config=configs/joint.py:tiny --config.train.steps=20 --workdir=/tmp/j
  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint --mode=evaluate
  python -m unpaired_seg.main --config=configs/multi_atlas.py --workdir=runs/multi_atlas  # no net

Multi-host (one `jax.distributed` job, the same command on every host; see the README):

  python -m unpaired_seg.main --config=configs/joint.py --workdir=gs://.../joint --multihost
  python -m unpaired_seg.main ... --multihost --coordinator_address=10.0.0.1:1234 \
      --num_processes=2 --process_id=0
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/joint.py[:tiny].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "train", ["train", "evaluate"], "Train (then evaluate) or only evaluate.")
flags.DEFINE_bool("multihost", False,
                  "Join a multi-process job (jax.distributed.initialize): TPU pods, GPU clusters.")
flags.DEFINE_string("coordinator_address", None,
                    "--multihost: host:port of process 0 (detected on Cloud TPU and SLURM).")
flags.DEFINE_integer("num_processes", None,
                     "--multihost: processes in the job (detected on Cloud TPU and SLURM).",
                     lower_bound=1)
flags.DEFINE_integer("process_id", None,
                     "--multihost: this process's index, 0..num_processes-1 (detected on Cloud "
                     "TPU and SLURM).", lower_bound=0)
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir's run although the config differs from its config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # after flag parsing, so XLA flags in the environment apply
  from unpaired_seg import distributed
  given = [n for n in ("coordinator_address", "num_processes", "process_id")
           if FLAGS[n].value is not None]
  if given and not FLAGS.multihost:
    sys.exit(f"error: --{given[0]} needs --multihost")
  if "baseline" in FLAGS.config:   # configs/{copy,register,multi_atlas}.py: nothing to train
    if FLAGS.multihost or FLAGS.mode != "train":
      sys.exit("error: a baseline config (config key 'baseline') runs on one process and has no "
               "--mode=evaluate: it predicts and scores in one pass")
    from unpaired_seg.baselines import run as baseline_run
    try:
      baseline_run.run(FLAGS.config, FLAGS.workdir)
    except baseline_run.USER_ERRORS as e:
      logging.error("%s", e)
      sys.exit(f"error: {e}")
    return
  if FLAGS.multihost:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from unpaired_seg import train
  logging.info("process %d/%d, %d local devices", jax.process_index(), jax.process_count(),
               jax.local_device_count())
  try:
    train.main_entry(FLAGS.config, FLAGS.workdir, FLAGS.mode, FLAGS.allow_config_change)
  except train.USER_ERRORS as e:   # a one-line message naming the file, key or flag
    logging.error("%s", e)
    sys.exit(f"error: {e}")


def parse_flags(argv):
  """absl's flag parsing, with a bad flag or a misspelled `--config.<key>` override reported in
  one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (KeyError, AttributeError) as e:   # ml_collections: an override names no config key
    raw = str(e.args[0] if e.args else e)
    key = re.search(r"(\w+)", raw)
    hint = re.search(r'Did you mean "(\w+)"', raw)
    key = key.group(1) if key else ""
    named = [a.split("=")[0] for a in argv[1:]
             if a.startswith("--config.") and key and key in a.split("=")[0].split(".")]
    sys.exit(f"error: {named[0] if named else '--config override'}: no such config key"
             + (f" (did you mean {hint.group(1)!r}?)" if hint else ""))


if __name__ == "__main__":
  sys.path.insert(0, ".")  # configs/ next to the working directory
  app.run(main, flags_parser=parse_flags)
