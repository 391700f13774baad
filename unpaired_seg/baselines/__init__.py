"""Classical registration baselines with SimpleITK: copy, register, multi_atlas.

  python -m unpaired_seg.baselines --config=configs/multi_atlas.py --workdir=runs/multi_atlas

`run.run(config, workdir)` is the one entry point; `registration` holds the SimpleITK calls and
`section` the `baseline` config section and its validation.
"""
