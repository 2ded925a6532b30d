r"""Run Multiagent Finetuning end to end from a config file.

    python -m launch.train --config=configs/demo.py[:variant] --workdir=DIR \
        [--config.iterations=5] [--config.debate.temperature=0.7] ...

The config (an ml_collections file; `--config.a.b=value` overrides any field)
is validated before anything is loaded or compiled: an impossible value fails
naming the field and why. A workdir that already holds the run resumes at the
stage in flight; a workdir holding a run with a different config is refused
(except `iterations`, which may grow to extend a finished run). Writes
metrics.jsonl, TensorBoard events (tb/), transcripts and checkpoints under
the workdir, prints a per-iteration table, and at the end report.md + plots.

    python -m launch.train --config=... --workdir=DIR --dry_run [--device_memory_gb=80]

prints the per-device memory plan of the config on its mesh (maft_jax/memory.py)
from abstract shapes and compiled programs, loading no weights and writing
nothing, and exits with status 1 naming the knob to turn if it would not fit.
"""


from absl import app, flags, logging
from ml_collections import config_flags

from launch import common
from maft_jax import config, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed when it holds state).",
                               required=True)
_REPORT = flags.DEFINE_bool("report", True, "Write report.md and plots at the end.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars for sampling and training.")
_INIT_DISTRIBUTED = common.define_distributed_flags()
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the per-device memory plan (parameters, optimizer state, KV cache, "
    "compiled temporaries) and exit without loading weights or writing anything; exit status 1 "
    "if the run would not fit.")
_DEVICE_MEMORY_GB = flags.DEFINE_float(
    "device_memory_gb", None, "--dry_run: memory per device in GB (default: what the first "
    "device reports; needed on CPU, e.g. to plan a GPU or TPU run from a laptop).")


def _capacity() -> int:
  import jax
  if _DEVICE_MEMORY_GB.value is not None:
    return int(_DEVICE_MEMORY_GB.value * 1e9)
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise SystemExit(f"error: {jax.devices()[0].platform} devices do not report their memory: "
                     "give --device_memory_gb")
  return int(stats["bytes_limit"])


def dry_run(plan) -> None:
  """Print the memory plan; exit 1 naming the knobs when it does not fit."""
  from maft_jax import hf, memory
  try:
    mp = memory.plan_run(plan, capacity=_capacity())
  except hf.HFError as e:
    raise SystemExit(f"error: {e}") from None
  print(mp.table())
  for note in config.layout_notes(plan):
    print(f"note: {note}")
  if not mp.fits:
    raise SystemExit(f"error: the run needs {mp.peak / 1e9:.1f} GB per device, more than "
                     f"the {mp.capacity / 1e9:.1f} GB there are; turn: {mp.advice()}")


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py:smoke")
  _INIT_DISTRIBUTED()
  try:
    plan = config.validate(_CONFIG.value)
    if _DRY_RUN.value:
      return dry_run(plan)
    run = loop.Run(plan, _WORKDIR.value, progress=_PROGRESS.value)
    run.check_workdir()
    run.run()
  except config.ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  from maft_jax import distributed
  if _REPORT.value and distributed.is_primary():
    from maft_jax import report
    for path in report.write(_WORKDIR.value):
      print(f"wrote {path}")


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  common.quiet_orbax()
  app.run(main, flags_parser=common.parse_flags)
