"""Baseline runs end to end on tiny phantoms: outputs that evaluate and compare read, the
methods' behaviour, and the one-line errors."""

import json
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from configs import copy as copy_config
from configs import multi_atlas as multi_atlas_config
from configs import register as register_config
from unpaired_seg import compare, config_schema, metrics, report
from unpaired_seg import evaluate as evaluate_lib
from unpaired_seg.baselines import registration, run, section
from unpaired_seg.data import loader

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
  base = tmp_path_factory.mktemp("phantoms")
  return {"paired": str(base / "paired"), "unpaired": str(base / "unpaired")}


def _config(module, roots, mode):
  config = module.get_config("tiny")
  config.data.phantom.mode = mode
  config.data.root = roots[mode]
  return config


def _mean_dice(a, b):
  return float(np.mean([metrics.dice(a == k, b == k) for k in range(1, 5)]))


def test_copy_writes_what_evaluate_and_compare_read(roots, tmp_path):
  workdir = tmp_path / "copy"
  summary = run.run(_config(copy_config, roots, "paired"), workdir)
  for name in ("config.json", "splits.json", "normalization.json", "summary.json", "summary.txt",
               "summary_per_case.csv", "predictions/index.json"):
    assert (workdir / name).is_file(), name
  on_disk = evaluate_lib.read_json(workdir / "summary.json", "summary")
  assert on_disk == json.loads(json.dumps(summary))
  assert on_disk["method"] == "copy" and on_disk["checkpoint"]["which"] == "none"
  assert set(on_disk["modalities"]) == {"mr", "ct"}
  assert on_disk["baseline"]["sources"] == {"mr": "ct", "ct": "mr"}
  collected = report.collect([("copy", workdir)])
  assert set(collected["copy"]["mr"]) == set(on_disk["modalities"]["mr"]["per_case"])
  written = compare.run([f"copy={workdir}"], tmp_path / "compare", ["dice"], overlays=1)
  assert written["overlays"] and all(p.is_file() for p in written["overlays"])
  # The phantom's modalities share one grid: copy's prediction for a case of one modality is
  # the other modality's label of the same subject, voxel for voxel.
  folder = workdir / evaluate_lib.PREDICTIONS_DIR
  index = json.loads((folder / "index.json").read_text())
  common = sorted(set(index["mr"]) & set(index["ct"]))
  assert common
  for case in common:
    pred = np.asarray(nib.load(str(folder / index["mr"][case]["prediction"])).dataobj)
    partner = np.asarray(nib.load(str(folder / index["ct"][case]["reference"])).dataobj)
    np.testing.assert_array_equal(pred, partner)
    assert on_disk["baseline"]["cases"][f"mr/{case}"]["from"] == [f"ct/{case}"]


def test_register_scores_every_test_volume_of_the_target(roots, tmp_path):
  config = _config(register_config, roots, "paired")
  config.baseline.target = "mr"
  summary = run.run(config, tmp_path / "register")
  assert list(summary["modalities"]) == ["mr"]
  block = summary["modalities"]["mr"]
  assert block["count"] and 0.0 < block["mean"]["dice"] <= 1.0
  assert all(v["seconds"] > 0 for v in summary["baseline"]["cases"].values())


def test_multi_atlas_beats_a_single_atlas_on_the_phantom(roots, tmp_path):
  config = _config(multi_atlas_config, roots, "unpaired")
  config.data.phantom.num_subjects = 10      # 6 CT atlases, 2 MR targets
  config.data.root = str(tmp_path / "phantom10")
  config.data.split.update(train=0.6, val=0.2, test=0.2)
  config.baseline.bspline_iterations = 0     # the affine stage; fusion is what is tested here
  data = loader.load_data(config, tmp_path / "work")
  settings = registration.Settings.from_config(config.baseline)
  atlases = run.choose_atlases(data.cases["train"]["ct"], 0, 0)
  assert len(atlases) >= 5
  single, fused = [], []
  for target in data.cases["test"]["mr"]:
    fixed = registration.to_image(target.grid_image, target.affine)
    warped = []
    for atlas in atlases:
      transform = registration.register(
          fixed, registration.to_image(atlas.grid_image, atlas.affine), settings)
      warped.append(registration.warp_labels(atlas.grid_label, atlas.affine, fixed, transform))
      single.append(_mean_dice(warped[-1], target.grid_label))
    fused.append(_mean_dice(registration.majority_vote(warped, 5), target.grid_label))
  assert np.mean(fused) > np.mean(single) + 0.02


def test_atlases_are_a_seeded_choice_of_the_labelled_training_volumes(roots, tmp_path):
  config = _config(multi_atlas_config, roots, "unpaired")
  data = loader.load_data(config, tmp_path)
  train = data.cases["train"]["ct"]
  assert len(run.choose_atlases(train, 0, 0)) == len(train)
  one = run.choose_atlases(train, 1, 3)
  assert len(one) == 1 and one == run.choose_atlases(train, 1, 3)
  unlabelled = [c.without_label() for c in train]
  with pytest.raises(config_schema.ConfigError, match="'baseline.atlases'"):
    run.choose_atlases(unlabelled, 1, 0)


@pytest.mark.parametrize("module,mode,change,key", [
    (copy_config, "unpaired", {}, "'method'"),
    (register_config, "unpaired", {}, "'method'"),
    (register_config, "paired", {"baseline.source": "mr", "baseline.target": "mr"},
     "'baseline.source'"),
    (multi_atlas_config, "unpaired", {"baseline.target": "pet"}, "'baseline.target'"),
    (multi_atlas_config, "unpaired", {"baseline.atlases": 50}, "'baseline.atlases'"),
    (multi_atlas_config, "unpaired", {"baseline.init": "moments"}, "'baseline.init'"),
    (multi_atlas_config, "unpaired", {"baseline.mesh_size": (4, 4)}, "'baseline.mesh_size'"),
    (multi_atlas_config, "unpaired", {"baseline.sampling": 0.0}, "'baseline.sampling'"),
    (multi_atlas_config, "unpaired", {"method": "atlas"}, "'method'"),
])
def test_bad_input_names_its_config_key(roots, tmp_path, module, mode, change, key):
  config = _config(module, roots, mode)
  for dotted, value in change.items():
    node = config
    *parents, name = dotted.split(".")
    for p in parents:
      node = node[p]
    node[name] = value
  with pytest.raises(config_schema.ConfigError, match=key) as info:
    run.run(config, tmp_path / "run")
  assert "\n" not in str(info.value)


def test_a_config_without_the_baseline_section_is_refused():
  from configs import joint
  config = joint.get_config("tiny")
  config.method = "multi_atlas"
  with pytest.raises(config_schema.ConfigError, match="'baseline'"):
    section.validate(config)


@pytest.mark.parametrize("entry", ["unpaired_seg.baselines", "unpaired_seg.main"])
def test_the_command_line_prints_one_line_for_bad_input(roots, tmp_path, entry):
  # unpaired_seg.main hands a config with a `baseline` section to the baselines' run.
  done = subprocess.run(
      [sys.executable, "-m", entry, "--config=configs/copy.py:tiny",
       "--config.data.phantom.mode=unpaired", f"--config.data.root={roots['unpaired']}",
       f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0
  assert done.stderr.strip().splitlines()[-1].startswith("error: config key 'method'")
