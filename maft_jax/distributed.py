"""Several JAX processes (a TPU pod slice, several GPU hosts) as one program.

Every process runs the same Python code on the same inputs (the debate's
prompts, the selection, the data order are all derived from seeds), and the
jitted programs see one global mesh over every process's devices. Three
rules keep that correct:

- host code reads a program's output with `to_host`, which gathers shards
  that live on other processes (`np.asarray` on such an array fails);
- only the primary process (process 0) writes files, and `barrier` makes the
  others wait until what they will read is there;
- collective writes (orbax checkpoints) are called by every process.

With one process every function here is trivial.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Join the other processes: explicitly (all three given); as JAX detects
  them on a Cloud TPU slice or a known cluster (`coordinator_address='auto'`
  alone, or nothing given on a multi-worker TPU VM); else a single process."""
  if coordinator_address == "auto" and num_processes is None and process_id is None:
    jax.distributed.initialize()
  elif any(x is not None for x in (coordinator_address, num_processes, process_id)):
    if None in (coordinator_address, num_processes, process_id):
      raise ValueError("give all of --coordinator_address, --num_processes and --process_id "
                       "(or --coordinator_address=auto alone, to let JAX detect them)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes="
                       f"{num_processes})")
    if num_processes == 1:
      return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      # CPU devices of several processes talk through gloo (tests, laptops).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _on_tpu_slice():
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _on_tpu_slice() -> bool:
  """A multi-worker Cloud TPU VM (the runtime names the workers)."""
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def is_primary() -> bool:
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op for one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
  """A program's output as a NumPy array on this host, whole."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
