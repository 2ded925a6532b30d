"""A human-readable report of a MAFT run, rebuilt from its workdir alone.

    run = read_run(workdir)                      # config.json + metrics.jsonl
    write(workdir, baselines={"single-agent FT": other_workdir})
        -> [report.md, accuracy.png, diversity.png]
    write_tensorboard(workdir, run.records)      # workdir/tb, rewritten
    console_table(run.records, config)           # printed after every evaluation

Why from the workdir: the driver rewrites `metrics.jsonl` (one typed record
per finished stage, `records`) as it goes, so a report can be regenerated at
any time (while the run is going, after a crash, after a resume) without the
model, and runs can be compared with each other (`baselines`) long after
they finished. A record that does not fit its schema, or of another record
version, is an error naming the file and line (`ReportError`); optional
fields that a run did not compute (the cross-agent NLL, a mode's own set
sizes) show as "-".

One table builder (`iteration_table`) serves report.md and the console.
matplotlib and tensorboardX are imported inside the functions that need
them, so importing this module stays cheap (the loop imports it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from maft_jax import files, records
from maft_jax.records import Eval, Record

REPORT = "report.md"
ACCURACY_PLOT = "accuracy.png"
DIVERSITY_PLOT = "diversity.png"
TB_DIR = "tb"


class ReportError(ValueError):
  """An unreadable run directory, file or line; names it."""


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: dict
  records: list[Record]
  workdir: str = ""

  def latest(self) -> dict[tuple[int, str], Any]:
    """(iteration, stage) -> its record's data (the last one, should a
    metrics file repeat a stage)."""
    return {(r.iteration, r.stage): r.data for r in self.records}

  def stage(self, name: str) -> dict[int, Any]:
    """iteration -> the data of that iteration's `name` stage."""
    return {k: d for (k, s), d in sorted(self.latest().items()) if s == name}


# ---------------------------------------------------------------- reading


def read_run(workdir: str) -> Run:
  """The run's config and its typed records."""
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir}: no such run directory")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(metrics_path):
    raise ReportError(f"{metrics_path}: not found (has the run evaluated anything yet?)")
  config_path = os.path.join(workdir, "config.json")
  config = files.read_json(config_path, error=ReportError)
  if not isinstance(config, dict):
    raise ReportError(f"{config_path}: expected a JSON object")
  name = config.get("name") or os.path.basename(os.path.abspath(workdir))
  done = records.read_lines(metrics_path, ReportError)
  return Run(name=str(name), config=config, records=done, workdir=os.path.abspath(workdir))


def offdiag_mean(matrix_AxA: Sequence[Sequence[float]] | None) -> float | None:
  """Mean of the off-diagonal entries of a square matrix (None: none)."""
  vals = [v for i, row in enumerate(matrix_AxA or ()) for j, v in enumerate(row) if i != j]
  return sum(vals) / len(vals) if vals else None


def _agents(config: Mapping) -> tuple[int | None, bool]:
  """(generators N, critics) from a run's config."""
  agents = config.get("agents") or {}
  return agents.get("generators"), agents.get("critics") is True


def _task_name(config: Mapping) -> str:
  return str((config.get("task") or {}).get("name") or "-")


# ---------------------------------------------------------------- formatting


def pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def pct_se(p: float | None, se: float | None) -> str:
  """'42.0% ± 2.2' (the standard error in percentage points), or just '42.0%'."""
  return pct(p) if p is None or se is None else f"{100 * p:.1f}% ± {100 * se:.1f}"


ACCURACY_FIELDS = ("round1_mean_accuracy", "debate_accuracy", "majority_accuracy",
                   "best_of_n_accuracy")


def accuracy(e: Eval | None, field: str) -> tuple[float | None, float | None]:
  """(accuracy, its standard error) of one of an eval record's ACCURACY_FIELDS."""
  if e is None:
    return None, None
  return getattr(e, field), getattr(e, field + "_se")


def _fixed(x: float | None, digits: int) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def _frac(x: float) -> str:
  """0.42 -> '.42' (compact per-agent accuracies)."""
  s = f"{x:.2f}"
  return s[1:] if s.startswith("0.") else s


def _mean(xs: Iterable[float | None]) -> float | None:
  vals = [v for v in xs if v is not None]
  return sum(vals) / len(vals) if vals else None


def _join(label: str, cells: list[str]) -> str:
  return f"{label} " + " ".join(cells) if cells else ""


def per_agent_accuracy(e: Eval | None, critics: bool) -> str:
  """'G .42 .40 .45 / C .50 .48 .47': generators' round-1, critics' final."""
  if e is None:
    return "-"
  parts = [_join("G", [_frac(v) for v in e.round1_accuracy])]
  if critics:
    parts.append(_join("C", [_frac(v) for v in e.final_accuracy]))
  return " / ".join(p for p in parts if p) or "-"


def per_agent_counts(values: list[int] | None, n: int | None, critics: bool) -> str:
  """'G 12 10 9 / C 8 7 6' from a list of A counts."""
  if not values:
    return "-"
  cells = [str(v) for v in values]
  gen, crit = (cells[:n], cells[n:]) if critics and n and len(cells) == 2 * n else (cells, [])
  return " / ".join(p for p in (_join("G", gen), _join("C", crit)) if p)


def _total(values: list[int] | None) -> str:
  """'31 (10 12 9)'."""
  return "-" if values is None else f"{sum(values)} ({' '.join(str(v) for v in values)})"


Table = tuple[list[str], list[list[str]]]   # header, rows of cells


def markdown(table: Table) -> list[str]:
  header, rows = table
  cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
  lines = ["| " + " | ".join(cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def text(table: Table) -> str:
  """The table in aligned columns (the console's)."""
  header, rows = table
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
                   for r in [header, *rows])


# ---------------------------------------------------------------- tables


def _iteration_columns(run: Run) -> dict[str, Callable[[int], str]]:
  """column -> its cell at iteration k, for the per-iteration table."""
  n, critics = _agents(run.config)
  ev, sel, ft = run.stage("eval"), run.stage("select"), run.stage("finetune")

  def loss(k):
    return _fixed(_mean(ft[k].final_loss), 4) if k in ft else "-"

  def field(name, show):
    return lambda k: show(getattr(ev[k], name)) if k in ev else "-"

  return {
      "iteration": str,
      "generators round 1 (mean)": lambda k: pct_se(*accuracy(ev.get(k), "round1_mean_accuracy")),
      "per agent": lambda k: per_agent_accuracy(ev.get(k), critics),
      "debate": lambda k: pct_se(*accuracy(ev.get(k), "debate_accuracy")),
      "majority vote (round 1)": lambda k: pct_se(*accuracy(ev.get(k), "majority_accuracy")),
      "best-of-N": lambda k: pct_se(*accuracy(ev.get(k), "best_of_n_accuracy")),
      "consensus": field("consensus_rate", pct),
      "distinct answers": field("distinct_answers", lambda v: _fixed(v, 2)),
      "3-gram overlap": field("ngram_overlap", lambda v: _fixed(v, 3)),
      "cross NLL (off-diag)": field("cross_nll", lambda v: _fixed(offdiag_mean(v), 3)),
      "selected examples": lambda k: per_agent_counts(sel[k].selected if k in sel else None,
                                                      n, critics),
      "finetune loss (mean)": loss,
  }


CONSOLE_COLUMNS = ("iteration", "per agent", "generators round 1 (mean)",
                   "majority vote (round 1)", "debate", "best-of-N", "consensus",
                   "selected examples")


def iteration_table(run: Run, baselines: Mapping[str, Run] = {},
                    columns: Sequence[str] | None = None) -> Table:
  """One row per iteration of the run or any baseline, with `columns`
  (default: all; baselines add a round-1 and a debate column each)."""
  table = _iteration_columns(run)
  header = list(columns or table)
  cells = [table[c] for c in header]
  base_evals = {label: b.stage("eval") for label, b in baselines.items()}
  for label in baselines:
    header += [f"{label}: round 1 (mean)", f"{label}: debate"]
  ks = sorted({r.iteration for b in (run, *baselines.values()) for r in b.records})
  rows = []
  for k in ks:
    row = [cell(k) for cell in cells]
    for label in baselines:
      e = base_evals[label].get(k)
      row += [pct_se(*accuracy(e, "round1_mean_accuracy")),
              pct_se(*accuracy(e, "debate_accuracy"))]
    rows.append(row)
  return header, rows


def console_table(done: Sequence[Record], config: Mapping) -> str:
  """The per-iteration table the driver prints after every evaluation."""
  run = Run(name=str(config.get("name") or ""), config=dict(config), records=list(done))
  return text(iteration_table(run, columns=CONSOLE_COLUMNS))


def _final_and_best(run: Run, field: str, show: Callable[[tuple], str]) -> list[str]:
  """[final, best] cells of an accuracy over the run's evaluations (the
  earliest best)."""
  scored = {k: accuracy(e, field) for k, e in run.stage("eval").items()}
  if not scored:
    return ["-", "-"]
  last = max(scored)
  best = max(scored, key=lambda k: (scored[k][0], -k))
  return [f"{show(scored[last])} (iteration {last})", f"{show(scored[best])} (iteration {best})"]


def baseline_rows(run: Run, baselines: Mapping[str, Run] = {}) -> Table:
  """The iteration-0 baselines of this run, then this run's and each baseline
  run's final and best accuracy (mean round 1 and debate)."""
  e0 = run.stage("eval").get(0)
  at0 = lambda field: pct(accuracy(e0, field)[0])  # noqa: E731
  rows = [
      ["base model", "generators round 1 (mean), iteration 0", at0("round1_mean_accuracy"), "-"],
      ["majority vote", "round 1, iteration 0", at0("majority_accuracy"), "-"],
      ["debate without finetuning", "debate, iteration 0", at0("debate_accuracy"), "-"],
      ["best-of-N with verifier", "round 1, iteration 0", at0("best_of_n_accuracy"), "-"],
  ]
  plain = lambda pse: pct(pse[0])  # noqa: E731
  for label, r in [(f"this run ({run.name})", run), *baselines.items()]:
    rows.append([label, "generators round 1 (mean)",
                 *_final_and_best(r, "round1_mean_accuracy", plain)])
    rows.append([label, "debate", *_final_and_best(r, "debate_accuracy", plain)])
  return ["baseline", "metric", "accuracy (final)", "best"], rows


def method_metric(config: Mapping) -> tuple[str, str]:
  """(eval field, its name) that a run's method is judged by: the debate
  when it debates, the majority vote of its N samples when it samples
  several without debate (majority finetuning), else its round-1 accuracy
  (one agent: STaR, rejection-sampling finetuning)."""
  n, _ = _agents(config)
  if ((config.get("eval") or {}).get("rounds") or 1) >= 2:
    return "debate_accuracy", "debate"
  if n is not None and n > 1:
    return "majority_accuracy", "majority vote"
  return "round1_mean_accuracy", "round 1"


def paper_rows(run: Run, baselines: Mapping[str, Run] = {}) -> Table:
  """The paper's Table 1 layout: Base, Majority and Debate (this run's
  iteration 0), each baseline run, then this run; each "acc ± se", at the
  final and the best iteration of the finetuned runs."""
  e0 = run.stage("eval").get(0)
  rows = [["Base", "round 1 (mean), iteration 0",
           pct_se(*accuracy(e0, "round1_mean_accuracy")), "-"],
          ["Majority", "majority vote, iteration 0",
           pct_se(*accuracy(e0, "majority_accuracy")), "-"],
          ["Debate", "debate, iteration 0", pct_se(*accuracy(e0, "debate_accuracy")), "-"]]
  for label, r in [*baselines.items(), (f"{run.name} (this run)", run)]:
    field, name = method_metric(r.config)
    rows.append([label, name, *_final_and_best(r, field, lambda pse: pct_se(*pse))])
  return ["method", "metric", "accuracy ± s.e. (final)", "best"], rows


def data_rows(run: Run) -> Table:
  """Per-iteration selection counts (total (per agent)) and consensus accuracy."""
  rows = [[str(k), r.mode, _total(r.d_g), _total(r.d_c_minus), _total(r.d_c_plus),
           _total(r.d_c_kept), pct(r.consensus_accuracy)]
          for k, r in run.stage("select").items()]
  return ["iteration", "mode", "D^G", "D^C-", "D^C+", "kept", "consensus accuracy"], rows


def render(run: Run, baselines: Mapping[str, Run] = {}) -> str:
  """report.md's text."""
  n, critics = _agents(run.config)
  iters = run.config.get("iterations")
  shape = (f"{n if n is not None else '?'} generators"
           + (f" + {n} critics" if critics and n is not None else ", no critics")
           + (f", {iters} iterations" if isinstance(iters, int) else ""))
  lines = [f"# {run.name}: {_task_name(run.config)}", "",
           f"MAFT run on task `{_task_name(run.config)}`: {shape}. Accuracies are on held-out "
           "problems; per agent: `G` = generators' round-1 accuracy, `C` = critics' "
           "final-round accuracy.", "", "## Per iteration", ""]
  lines += markdown(iteration_table(run, baselines))
  lines += ["", "## As in the paper's Table 1", "",
            "Accuracy ± its standard error on the n held-out problems: binomial, "
            "sqrt(p(1-p)/n); for a mean over generators, over problems of their per-problem "
            "mean. Base, Majority and "
            "Debate are this run's iteration 0; each other row is a run at its final and its "
            "best iteration.", ""]
  lines += markdown(paper_rows(run, baselines))
  lines += ["", "## Baselines", ""]
  lines += markdown(baseline_rows(run, baselines))
  lines += ["", "## Data", "",
            "Selected finetuning examples per iteration: total (per agent).", ""]
  table = data_rows(run)
  lines += markdown(table) if table[1] else ["No selection records yet."]
  lines += ["", "## Provenance", "",
            f"Run directory `{run.workdir}` (config.json, metrics.jsonl: "
            f"{len(run.records)} records); report written by "
            f"`python -m launch.report --workdir={run.workdir}`."]
  for label, b in baselines.items():
    lines.append(f"Baseline `{label}`: `{b.workdir}`.")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
  """A Figure on the Agg canvas: no pyplot, so no global backend switch."""
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    raise ReportError("plots need matplotlib: pip install matplotlib") from None
  fig = Figure(figsize=size, layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(nrows, ncols, squeeze=False)[0]


def _series(run: Run, fn: Callable[[Eval], float | None]) -> dict[int, float]:
  """iteration -> fn(its eval record), where fn gives a value."""
  return {k: v for k, e in run.stage("eval").items() if (v := fn(e)) is not None}


def _plot(ax, series: Mapping[int, float], scale: float = 1, **kw) -> None:
  """One line (with markers, so a single iteration shows) unless empty."""
  if series:
    xs = sorted(series)
    ax.plot(xs, [series[k] * scale for k in xs], marker="o", **kw)


def _band(ax, run: Run, field: str, color: str) -> None:
  """A shaded band of ± one standard error around an accuracy series."""
  points = {k: accuracy(e, field) for k, e in run.stage("eval").items()}
  if points:
    xs = sorted(points)
    ax.fill_between(xs, [100 * (points[k][0] - points[k][1]) for k in xs],
                    [100 * (points[k][0] + points[k][1]) for k in xs], color=color, alpha=0.15,
                    lw=0)


def _integer_x(ax) -> None:
  from matplotlib.ticker import MaxNLocator
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("iteration")


def _field(name: str) -> Callable[[Eval], float]:
  return lambda e: getattr(e, name)


def plot_accuracy(run: Run, path: str, baselines: Mapping[str, Run] = {}) -> None:
  fig, (ax,) = _figure(1, 1, (7.5, 4.8))
  n_gen = max((len(e.round1_accuracy) for e in run.stage("eval").values()), default=0)
  for i in range(n_gen):
    _plot(ax, _series(run, lambda e, i=i: e.round1_accuracy[i] if i < len(e.round1_accuracy)
                      else None), scale=100, lw=0.8, alpha=0.5, ms=2,
          label=f"generator {i} (round 1)")
  _plot(ax, _series(run, _field("round1_mean_accuracy")), scale=100, lw=1.8, color="C0",
        label="generators round 1 (mean)")
  _plot(ax, _series(run, _field("majority_accuracy")), scale=100, lw=1.5, color="C2",
        label="majority vote (round 1)")
  _plot(ax, _series(run, _field("debate_accuracy")), scale=100, lw=3, color="C3",
        label="debate (bands: ± 1 s.e.)")
  for field, color in (("round1_mean_accuracy", "C0"), ("majority_accuracy", "C2"),
                       ("debate_accuracy", "C3")):
    _band(ax, run, field, color)
  e0 = run.stage("eval").get(0)
  if e0 is not None:
    ax.axhline(100 * e0.best_of_n_accuracy, color="k", ls=":", lw=1.2,
               label="best-of-N, iteration 0")
  for j, (label, b) in enumerate(baselines.items()):
    color = f"C{4 + j % 6}"
    _plot(ax, _series(b, _field("round1_mean_accuracy")), scale=100, ls="--", lw=1, ms=3,
          color=color, alpha=0.7, label=f"{label}: round 1 (mean)")
    _plot(ax, _series(b, _field("debate_accuracy")), scale=100, ls="--", lw=2, color=color,
          label=f"{label}: debate")
    _band(ax, b, method_metric(b.config)[0], color)
  ax.set_ylabel("accuracy (%)")
  ax.set_title(f"{run.name}: {_task_name(run.config)}")
  _integer_x(ax)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, loc="best")
  with files.atomic(path) as f:
    fig.savefig(f, format="png", dpi=110)


def plot_diversity(run: Run, path: str) -> None:
  nll = _series(run, lambda e: offdiag_mean(e.cross_nll))
  panels = [("distinct answers per problem", _series(run, _field("distinct_answers"))),
            ("3-gram overlap (round 1)", _series(run, _field("ngram_overlap")))]
  if nll:
    panels.append(("cross-agent NLL (off-diagonal mean)", nll))
  fig, axes = _figure(1, len(panels), (4 * len(panels), 3.6))
  for ax, (title, series) in zip(axes, panels):
    _plot(ax, series, lw=1.8)
    ax.set_title(title, fontsize=10)
    _integer_x(ax)
    ax.grid(alpha=0.3)
  fig.suptitle(f"{run.name}: diversity")
  with files.atomic(path) as f:
    fig.savefig(f, format="png", dpi=110)


# ---------------------------------------------------------------- entry points


def parse_baselines(specs: Sequence[str]) -> dict[str, str]:
  """['LABEL=DIR', ...] -> {label: dir}."""
  out: dict[str, str] = {}
  for spec in specs:
    label, sep, workdir = spec.partition("=")
    if not sep or not label.strip() or not workdir.strip():
      raise ReportError(f"--baseline={spec!r}: expected LABEL=DIR")
    if label.strip() in out:
      raise ReportError(f"--baseline={spec!r}: label {label.strip()!r} given twice")
    out[label.strip()] = workdir.strip()
  return out


def write(workdir: str, *, baselines: Mapping[str, str] = {}, out_dir: str | None = None,
          ) -> list[str]:
  """Write report.md, accuracy.png and diversity.png into out_dir (default:
  workdir); `baselines` maps a label to another run's workdir. Returns the paths."""
  run = read_run(workdir)
  others = {label: read_run(d) for label, d in baselines.items()}
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, name) for name in (REPORT, ACCURACY_PLOT, DIVERSITY_PLOT)]
  text = render(run, others)

  files.write_text(paths[0], text)
  plot_accuracy(run, paths[1], others)
  plot_diversity(run, paths[2])
  return paths


def scalars(done: Iterable[Record]) -> list[tuple[str, float, int]]:
  """(tag, value, step=iteration) of every number in the records: fields as
  `stage/field` (and `stage/seconds`), per-agent lists as
  `stage/field/agent_i` (None entries skipped), plus `eval/cross_nll_offdiag`."""
  out = []
  for (k, stage), r in sorted({(r.iteration, r.stage): r for r in done}.items()):
    data = r.data
    out.append((f"{stage}/seconds", r.seconds, k))
    for field, value in dataclasses.asdict(data).items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        out.append((f"{stage}/{field}", float(value), k))
      elif isinstance(value, list) and not any(isinstance(x, list) for x in value):
        out += [(f"{stage}/{field}/agent_{i}", float(x), k)
                for i, x in enumerate(value) if x is not None]
    if stage == "eval" and (v := offdiag_mean(data.cross_nll)) is not None:
      out.append(("eval/cross_nll_offdiag", v, k))
  return out


def _remove_event_files(logdir: str) -> None:
  """Delete TensorBoard event files (and directories left empty) under logdir;
  anything else is left alone."""
  for root, _, names in os.walk(logdir, topdown=False):
    for name in names:
      if name.startswith("events.out.tfevents."):
        os.remove(os.path.join(root, name))
    if root != logdir and not os.listdir(root):
      os.rmdir(root)


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without torch. Its writer module
  imports torch whenever it is installed, only to accept torch tensors; the
  run logs floats, and torch would cost every run ~3.5 CPU-s and ~300 MB
  (measured on the smoke run, 2 cores). A process that already holds torch
  keeps it."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter


def write_tensorboard(workdir: str, done: Iterable[Record], logdir: str | None = None,
                      ) -> str | None:
  """Rewrite the event files under logdir (default workdir/tb) from the
  records, so that a resumed run never duplicates points. Returns logdir, or
  None (with a warning) when tensorboardX is not installed."""
  try:
    SummaryWriter = _summary_writer()
  except ImportError:
    logging.warning("tensorboardX is not installed (pip install tensorboardX): "
                    "no TensorBoard events written")
    return None
  logdir = logdir or os.path.join(workdir, TB_DIR)
  points = scalars(done)
  _remove_event_files(logdir)
  writer = SummaryWriter(logdir)
  try:
    for tag, value, step in points:
      writer.add_scalar(tag, value, global_step=step)
  finally:
    writer.close()
  return logdir
