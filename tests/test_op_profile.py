"""The per-operation profile of the benchmark: HLO parsing, the roles, and a real traced step."""

import json
import os
import subprocess
import sys

from unpaired_seg import op_profile

HLO = """
  %param_3 = f32[3,3,32,16]{3,2,1,0} parameter(3)
  %p0 = f32[16,64,64,32]{3,2,1,0} parameter(0)
  %ynn_fusion.1 = f32[16,64,64,16]{3,2,1,0} fusion(%p0, %param_3), kind=kCustom, calls=%f1, metadata={op_name="jit(step)/jvp(UNet)/dec0/conv/conv0/conv_general_dilated" stack_frame_id=1}
  %ynn_fusion.2 = f32[32,3,3,16]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%f2, metadata={op_name="jit(step)/transpose(jvp(UNet))/dec0/conv/conv0/conv_general_dilated" stack_frame_id=1}
  %ynn_fusion.3 = f32[16,4,4,32]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%f3, metadata={op_name="jit(step)/transpose(jvp(UNet))/bottleneck/conv0/conv_general_dilated" stack_frame_id=1}
"""


def test_instructions_are_matched_with_their_source_and_pass():
  sources = op_profile.instruction_sources(HLO)
  kernels = op_profile.kernel_shapes(HLO)
  assert kernels == {(3, 3, 16, 32)}      # the activation parameter is not a kernel
  roles = {name: op_profile.role(op, shape, kernels) for name, (shape, op) in sources.items()}
  assert roles == {"ynn_fusion.1": "forward conv_general_dilated",
                   "ynn_fusion.2": "backward conv_general_dilated (kernel grad)",
                   # 4 x 4 activations are not a kernel: their dimensions match none.
                   "ynn_fusion.3": "backward conv_general_dilated (input grad)"}


def test_summary_sums_per_run_and_leaves_out_wrapping_events():
  events = [{"name": "ynn_fusion.1", "dur": 3000}, {"name": "ynn_fusion.1", "dur": 1000},
            {"name": "ynn_fusion.2", "dur": 2000}, {"name": "ThunkExecutor::Execute", "dur": 9000},
            {"name": "transpose_copy_fusion.4", "dur": 600}]
  summary = op_profile.summarise(events, op_profile.instruction_sources(HLO), runs=2,
                                 kernels=op_profile.kernel_shapes(HLO))
  assert summary["traced_ms_per_step"] == 3.3                  # (3 + 1 + 2 + 0.6) ms / 2 runs
  assert summary["by_role_ms"]["forward conv_general_dilated"] == 2.0
  assert summary["by_role_ms"]["backward conv_general_dilated (kernel grad)"] == 1.0
  assert summary["by_role_ms"]["unattributed transpose_copy_fusion"] == 0.3
  assert summary["top"][0]["instruction"] == "ynn_fusion.1"
  assert summary["top"][0]["source"] == "dec0/conv/conv0/conv_general_dilated"


def test_benchmark_profile_of_a_real_step_names_its_convolutions():
  out = subprocess.run(
      [sys.executable, "-m", "unpaired_seg.benchmark", "--config=configs/joint.py:tiny",
       "--steps=2", "--profile"], capture_output=True, text=True, timeout=300, check=True,
      env={**os.environ, "XLA_FLAGS": ""})   # one CPU device: no collectives in the step
  figures = json.loads(out.stdout.strip().splitlines()[-1])
  profile = figures["profile"]
  roles = profile["by_role_ms"]
  for r in ("forward conv_general_dilated", "backward conv_general_dilated (input grad)",
            "backward conv_general_dilated (kernel grad)"):
    assert roles.get(r, 0) > 0, roles
  # The named operations account for most of the step (the rest is the executor's own time).
  assert 0 < profile["traced_ms_per_step"] <= 3 * figures["step_ms"]
