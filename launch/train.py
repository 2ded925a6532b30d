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
"""


from absl import app, flags, logging
from ml_collections import config_flags

from launch import common
from maft_jax import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (resumed when it holds state).",
                               required=True)
_REPORT = flags.DEFINE_bool("report", True, "Write report.md and plots at the end.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bars for sampling and training.")


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py:smoke")
  try:
    plan = loop.validate(_CONFIG.value)
    run = loop.Run(plan, _WORKDIR.value, progress=_PROGRESS.value)
    run.check_workdir()
  except loop.ConfigError as e:
    raise SystemExit(f"error: {e}") from None
  run.run()
  if _REPORT.value:
    from maft_jax import report
    for path in report.write(_WORKDIR.value):
      print(f"wrote {path}")


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  common.quiet_orbax()
  app.run(main, flags_parser=common.parse_flags)
