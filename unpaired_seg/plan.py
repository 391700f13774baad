"""`python -m unpaired_seg.plan`: the same command as `python -m unpaired_seg.data.plan`.

  python -m unpaired_seg.plan --data=/tmp/abdomen_ctmr_2mm --budget_minutes=30

See `unpaired_seg/data/plan.py` for what the plan holds.
"""

import pathlib
import sys

from absl import app, flags

from unpaired_seg.data import plan

if __name__ == "__main__":
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))   # configs/
  plan._define_flags()  # noqa: SLF001  (the flags belong to the command, defined only when run)
  flags.adopt_module_key_flags(plan)   # so that --help lists them
  app.run(plan.main)
