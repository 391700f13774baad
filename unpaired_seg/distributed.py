"""Processes and devices: the multi-controller runtime, the mesh, and the sharding of batches.

One `jax.distributed` job: every process runs the same program on its own devices. The global batch
is one array over all devices on the mesh's `data` axis; each process builds only its own rows
(`local_rows`) and the global batch does not depend on how the devices are split over processes.
Only process 0 writes files (`is_main_process`).

  distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0)
"""

from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import flags, logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the job; with no arguments, JAX detects them (Cloud TPU, SLURM, Open MPI).

  On CPU the processes' collectives go through gloo (JAX's default CPU implementation).
  """
  kwargs = {k: v for k, v in (("coordinator_address", coordinator_address),
                              ("num_processes", num_processes), ("process_id", process_id))
            if v is not None}
  jax.distributed.initialize(**kwargs)
  # Orbax's barriers default to collectives, and a gloo collective gives up when the processes
  # reach it more than 30 s apart (one still initialising, the other waiting); the coordination
  # service's barriers wait for minutes.
  if flags.FLAGS.is_parsed():
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
  sync("initialized")
  # The first collective sets up gloo's connections: made here, while the processes are together.
  multihost_utils.sync_global_devices("unpaired_seg_collectives")
  logging.info("process %d of %d, %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
  """Process 0 writes the workdir's files and logs; the others compute and stay silent."""
  return jax.process_index() == 0


def make_mesh() -> Mesh:
  """All devices of all processes on one `data` axis (one device on a laptop)."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def local_rows(mesh: Mesh, global_batch: int) -> slice:
  """The rows of a global batch that this process's devices hold (one contiguous range)."""
  sharding = NamedSharding(mesh, P("data"))
  index = sharding.addressable_devices_indices_map((global_batch,))
  starts = sorted((idx[0].start or 0, idx[0].stop or global_batch) for idx in index.values())
  for (_, stop), (start, _) in zip(starts, starts[1:]):
    if stop != start:
      raise ValueError(f"this process's devices hold rows {starts} of the batch, not one range")
  return slice(starts[0][0], starts[-1][1])


def shard_batch(batch: Mapping, mesh: Mesh, global_batch: int | None = None):
  """The global batch on the mesh, batch axis on `data`, from this process's rows of it.

  `batch` holds this process's rows only (`local_rows`) when `global_batch` is given; otherwise
  it is the whole global batch, of which each process keeps its own rows.
  """
  sharding = NamedSharding(mesh, P("data"))

  def put(x):
    x = np.asarray(x)
    if global_batch is None:
      rows = local_rows(mesh, x.shape[0])
      return jax.make_array_from_process_local_data(sharding, x[rows], global_shape=x.shape)
    return jax.make_array_from_process_local_data(
        sharding, x, global_shape=(global_batch,) + x.shape[1:])
  return jax.tree.map(put, batch)


def replicate(tree, mesh: Mesh):
  """Every leaf whole on every device of the mesh (parameters, optimiser state, step).

  Each process holds the same values (the same seed, or the same checkpoint), so each one fills
  its own devices from its own copy; no bytes cross between processes.
  """
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(put, tree)


def local_copy(tree):
  """A replicated tree as single-device arrays on this process's first device.

  Evaluation runs on these, with no collective between processes, so each process may evaluate
  on its own.
  """
  if jax.process_count() == 1:
    return tree
  device = jax.local_devices()[0]

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return jax.device_put(x.addressable_data(0), device)
    return x
  return jax.tree.map(get, tree)


def broadcast_from_main(value: float) -> float:
  """Process 0's value on every process (decisions that all processes must take alike)."""
  if jax.process_count() == 1:
    return value
  return float(multihost_utils.broadcast_one_to_all(np.float32(value)))


def sync(name: str, timeout_s: int = 600) -> None:
  """Waits until every process reaches this point (a barrier of the coordination service).

  `name` must be new for each call in a run.
  """
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"unpaired_seg_{name}", timeout=timeout_s,
                                        barrier_sync_fn=ocp.multihost.get_barrier_sync_fn())
