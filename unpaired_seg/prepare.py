"""`python -m unpaired_seg.prepare`: the same command as `python -m unpaired_seg.data.prepare`.

  python -m unpaired_seg.prepare --source=abdomen_ctmr --input=/work/shared/data/abdomen_ctmr \
      --output=/tmp/abdomen_ctmr_2mm --spacing=2,2

See `unpaired_seg/data/prepare.py` for every flag.
"""

from absl import app, flags

from unpaired_seg.data import prepare

if __name__ == "__main__":
  prepare._define_flags()  # noqa: SLF001  (the flags belong to the command, defined only when run)
  flags.adopt_module_key_flags(prepare)   # so that --help lists them
  app.run(prepare.main)
