r"""Write a run's report (report.md, accuracy.png, diversity.png) from its workdir.

    python -m launch.report --workdir=DIR [--baseline=LABEL=DIR ...] [--out_dir=DIR]
                            [--tensorboard]

Each --baseline adds another run (e.g. single-agent finetuning) to the tables
and, dashed, to the accuracy plot. Reads only config.json and metrics.jsonl, so
it works on a running, crashed or finished run without the model. Bad input
exits with a one-line `error: ...`.
"""

from absl import app, flags

from maft_jax import report

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
_BASELINE = flags.DEFINE_multi_string("baseline", [], "LABEL=DIR of another run to compare with.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write (default: the workdir).")
_TENSORBOARD = flags.DEFINE_bool("tensorboard", False, "Also rewrite WORKDIR/tb event files.")


def main(argv):
  del argv
  try:
    baselines = report.parse_baselines(_BASELINE.value)
    paths = report.write(_WORKDIR.value, baselines=baselines, out_dir=_OUT_DIR.value)
    if _TENSORBOARD.value:
      logdir = report.write_tensorboard(_WORKDIR.value, report.read_run(_WORKDIR.value).records)
      paths += [logdir] if logdir else []
  except (report.ReportError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
  for path in paths:
    print(path)


if __name__ == "__main__":
  app.run(main)
