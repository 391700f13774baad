"""Where a compiled step's time goes, per XLA operation, from a profiler trace.

  python -m unpaired_seg.benchmark --config=configs/joint.py --profile

XLA:CPU names one trace event per executed thunk (a fusion, a convolution, a copy) when
`--xla_cpu_enable_xprof_traceme` is on; `enable()` sets it, before the backend starts. Each event
is matched with its instruction in the optimised HLO, whose metadata says which source operation
it came from and whether it belongs to the backward pass (`transpose(jvp(...))`), so the time can
be summed per (pass, operation): e.g. the convolutions' forward pass, their input and kernel
gradients, the elementwise fusions. GPU and TPU traces name their kernels differently; there the
per-event table is still printed, the grouping may be coarser.
"""

import collections
import gzip
import json
import os
import pathlib
import re
import tempfile

import jax

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Events that wrap others (the executor, Python frames, the thread pool's waits).
_WRAPPERS = ("ThunkExecutor", "$", "Pjit", "Slinky", "CommonPjRt", "ParseArguments")
_INSTRUCTION = re.compile(r"%([\w.\-]+) = (\S+) [\w\-]+\(.*?op_name=\"([^\"]+)\"")


def enable() -> None:
  """Names XLA:CPU's thunks in traces; call before the first JAX computation."""
  flags = os.environ.get("XLA_FLAGS", "")
  if TRACEME_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {TRACEME_FLAG}".strip()


def _dims(shape: str) -> tuple[int, ...]:
  inside = re.search(r"\[([\d,]*)\]", shape)
  return tuple(int(d) for d in inside.group(1).split(",") if d) if inside else ()


def instruction_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, source op_name) from optimised HLO text."""
  return {m.group(1): (m.group(2), m.group(3)) for m in _INSTRUCTION.finditer(hlo_text)}


def kernel_shapes(hlo_text: str) -> set[tuple[int, ...]]:
  """The sorted dimensions of every convolution kernel among the entry's parameters.

  A kernel is [*window, in, out] with every window size <= 7; a backward convolution whose
  result has a kernel's dimensions (in any layout) is that kernel's gradient.
  """
  out = set()
  for m in re.finditer(r"= (f32|bf16|f16)\[([\d,]+)\]\S* parameter\(", hlo_text):
    dims = tuple(int(d) for d in m.group(2).split(","))
    if len(dims) >= 4 and all(d <= 7 for d in dims[:-2]):
      out.add(tuple(sorted(dims)))
  return out


def role(op_name: str, shape: str, kernels: set = frozenset()) -> str:
  """'<pass> <operation>': forward or backward, and the source operation's primitive; a
  backward convolution is split into the kernel and the input gradient (`kernel_shapes`)."""
  backward = "transpose(" in op_name
  primitive = op_name.rsplit("/", 1)[-1]
  if primitive == "conv_general_dilated" and backward:
    kernel = tuple(sorted(_dims(shape))) in kernels
    primitive += " (kernel grad)" if kernel else " (input grad)"
  return f"{'backward' if backward else 'forward'} {primitive}"


def trace_events(trace_dir: str | os.PathLike) -> list[dict]:
  files = sorted(pathlib.Path(trace_dir).rglob("*perfetto_trace.json.gz"))
  if not files:
    raise RuntimeError(f"no perfetto trace under {trace_dir}")
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarise(events: list[dict], sources: dict, runs: int, top: int = 15,
              kernels: set = frozenset()) -> dict:
  """Milliseconds per run by role and for the `top` slowest instructions."""
  per_name = collections.Counter()
  for e in events:
    if not e["name"].startswith(_WRAPPERS):
      per_name[e["name"]] += e["dur"] / 1000 / runs
  by_role = collections.Counter()
  rows = []
  for name, ms in per_name.items():
    shape, op = sources.get(name, ("", ""))
    # Instructions without source metadata are XLA's own (layout copies, mostly).
    r = role(op, shape, kernels) if op else f"unattributed {name.split('.')[0]}"
    by_role[r] += ms
    rows.append({"instruction": name, "ms": round(ms, 2), "role": r, "shape": shape.split("{")[0],
                 "source": "/".join(part for part in op.split("/")
                                    if not part.startswith(("jit(", "jvp(", "transpose(")))})
  rows.sort(key=lambda row: -row["ms"])
  return {"traced_ms_per_step": round(sum(per_name.values()), 1),
          "by_role_ms": {k: round(v, 1) for k, v in by_role.most_common(12)},
          "top": rows[:top]}


def profile_compiled(compiled, state, batch, runs: int = 3, top: int = 15):
  """Runs `compiled(state, batch)` `runs` times under the profiler; returns (state, summary)."""
  hlo = compiled.as_text()
  sources, kernels = instruction_sources(hlo), kernel_shapes(hlo)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(runs):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    events = trace_events(tmp)
  return state, summarise(events, sources, runs, top, kernels)
