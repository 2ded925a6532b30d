"""A human-readable report of a MAFT run, rebuilt from its workdir alone.

    run = read_run(workdir)                      # config.json + metrics.jsonl
    write(workdir, baselines={"single-agent FT": other_workdir})
        -> [report.md, accuracy.png, diversity.png]
    write_tensorboard(workdir, run.records)      # workdir/tb, rewritten

Why from the workdir: the loop appends one JSON record per (iteration, stage)
to `metrics.jsonl` as it goes, so a report can be regenerated at any time (while
the run is going, after a crash, after a resume) without the model, and runs
can be compared with each other (`baselines`) long after they finished.

Records are read tolerantly: older runs lack some fields, and a field that is
missing, null or of the wrong type shows as "-" (a gap in a plot) instead of
failing the report. Only an unreadable file or line is an error
(`ReportError`, naming the file and line). A resumed run may log the same
(iteration, stage) twice; the last record wins, everywhere.

matplotlib and tensorboardX are imported inside the functions that need them,
so importing this module stays cheap (the loop imports it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from maft_jax import files

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
  records: list[dict]
  workdir: str = ""


# ---------------------------------------------------------------- reading


def _read_records(path: str) -> list[dict]:
  records = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ReportError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ReportError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
      iteration = record.get("iteration")
      if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise ReportError(f"{path}:{lineno}: 'iteration' must be an integer >= 0, "
                          f"got {iteration!r}")
      if not isinstance(record.get("stage"), str):
        raise ReportError(f"{path}:{lineno}: 'stage' must be a string, got {record.get('stage')!r}")
      records.append(record)
  return records


def read_run(workdir: str) -> Run:
  """The run's config (empty when config.json is absent) and metric records."""
  if not os.path.isdir(workdir):
    raise ReportError(f"{workdir}: no such run directory")
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(metrics_path):
    raise ReportError(f"{metrics_path}: not found (has the run evaluated anything yet?)")
  config: dict = {}
  config_path = os.path.join(workdir, "config.json")
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except json.JSONDecodeError as e:
      raise ReportError(f"{config_path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(config, dict):
      raise ReportError(f"{config_path}: expected a JSON object")
  name = config.get("name") or os.path.basename(os.path.abspath(workdir))
  return Run(name=str(name), config=config, records=_read_records(metrics_path),
             workdir=os.path.abspath(workdir))


def latest(records: Iterable[dict]) -> dict[tuple[int, str], dict]:
  """(iteration, stage) -> its last record (a resumed run may repeat one)."""
  return {(r["iteration"], r["stage"]): r for r in records}


def iterations(records: Iterable[dict]) -> list[int]:
  return sorted({r["iteration"] for r in records})


# ---------------------------------------------------------------- tolerant field access


def _num(x: Any) -> float | None:
  """x as a finite float, or None (missing, null, NaN, not a number)."""
  if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
    return None
  return float(x)


def _nums(x: Any) -> list[float | None] | None:
  """x as a list of finite-floats-or-None, or None when x is not a list."""
  return [_num(v) for v in x] if isinstance(x, list) else None


def _mean(xs: Sequence[float | None] | None) -> float | None:
  vals = [v for v in xs or () if v is not None]
  return sum(vals) / len(vals) if vals else None


def offdiag_mean(matrix_AxA: Any) -> float | None:
  """Mean of the finite off-diagonal entries of a square list-of-lists."""
  if not isinstance(matrix_AxA, list) or not all(isinstance(r, list) for r in matrix_AxA):
    return None
  return _mean([_num(v) for i, row in enumerate(matrix_AxA)
                for j, v in enumerate(row) if i != j])


def _agents(config: Mapping) -> tuple[int | None, bool]:
  """(generators N or None, critics) from the config."""
  agents = config.get("agents") if isinstance(config.get("agents"), dict) else {}
  n = agents.get("generators")
  n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
  return n, agents.get("critics") is True


def _task_name(config: Mapping) -> str:
  task = config.get("task")
  return str(task.get("name")) if isinstance(task, dict) and task.get("name") else "-"


def round1_mean(eval_record: Mapping | None) -> float | None:
  return _mean(_nums((eval_record or {}).get("round1_accuracy")))


def _series(run: Run, fn: Callable[[Mapping], float | None], stage: str = "eval",
            ) -> dict[int, float]:
  """iteration -> fn(record of that stage), where fn gives a value."""
  out = {}
  for (k, s), r in sorted(latest(run.records).items()):
    if s == stage and (v := fn(r)) is not None:
      out[k] = v
  return out


def _field(name: str) -> Callable[[Mapping], float | None]:
  return lambda r: _num(r.get(name))


# ---------------------------------------------------------------- formatting


def pct(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def binomial_se(p: float | None, n: Any) -> float | None:
  """sqrt(p (1 - p) / n), or None without a p or a count."""
  if p is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
    return None
  return math.sqrt(p * (1 - p) / n)


def pct_se(p: float | None, se: float | None) -> str:
  """'42.0% ± 2.2' (the standard error in percentage points), or just '42.0%'."""
  return pct(p) if p is None or se is None else f"{100 * p:.1f}% ± {100 * se:.1f}"


def accuracy(record: Mapping | None, field: str) -> tuple[float | None, float | None]:
  """(accuracy, its standard error) of an eval record's field. The error is
  the record's own `<field>_se`, else sqrt(p(1-p)/n) over its `problems`.
  `round1_mean` is the generators' mean: the record's round1_mean_accuracy
  (its error is over problems, `metrics.mean_with_error`), else the mean of
  round1_accuracy with the binomial error over problems, which bounds it."""
  r = record or {}
  if field == "round1_mean":
    if _num(r.get("round1_mean_accuracy")) is not None:
      field = "round1_mean_accuracy"
    else:  # older records: the mean, and the binomial error over problems (an upper bound)
      p = _mean(_nums(r.get("round1_accuracy")))
      return p, binomial_se(p, r.get("problems"))
  p = _num(r.get(field))
  se = _num(r.get(field + "_se"))
  return p, se if se is not None else binomial_se(p, r.get("problems"))


def _fixed(x: float | None, digits: int) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def _frac(x: float | None) -> str:
  """0.42 -> '.42' (compact per-agent accuracies); None -> '-'."""
  if x is None:
    return "-"
  s = f"{x:.2f}"
  return s[1:] if s.startswith("0.") else s


def _count(x: Any) -> str:
  return str(x) if isinstance(x, int) and not isinstance(x, bool) else "-"


def _split_gc(values: list, n: int | None, critics: bool) -> tuple[list, list]:
  """(generators, critics) halves of a per-agent list of A = 2N entries."""
  if critics and n is not None and len(values) == 2 * n:
    return values[:n], values[n:]
  return values, []


def _join(label: str, cells: list[str]) -> str:
  return f"{label} " + " ".join(cells) if cells else ""


def per_agent_accuracy(eval_record: Mapping | None, critics: bool) -> str:
  """'G .42 .40 .45 / C .50 .48 .47': generators' round-1, critics' final."""
  r = eval_record or {}
  gen = _nums(r.get("round1_accuracy"))
  parts = [_join("G", [_frac(v) for v in gen])] if gen else []
  final = _nums(r.get("final_accuracy"))
  if critics and final:
    parts.append(_join("C", [_frac(v) for v in final]))
  return " / ".join(parts) or "-"


def per_agent_counts(values: Any, n: int | None, critics: bool) -> str:
  """'G 12 10 9 / C 8 7 6' from a list of A counts."""
  if not isinstance(values, list) or not values:
    return "-"
  gen, crit = _split_gc([_count(v) for v in values], n, critics)
  return " / ".join(p for p in (_join("G", gen), _join("C", crit)) if p)


def _total(values: Any) -> str:
  """'31 (10 12 9)'."""
  if not isinstance(values, list):
    return "-"
  cells = [_count(v) for v in values]
  ints = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
  return f"{sum(ints)} ({' '.join(cells)})" if ints else "-"


def _cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
  lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
  return lines


# ---------------------------------------------------------------- report.md


ITERATION_HEADER = (
    "iteration", "generators round 1 (mean)", "per agent", "debate", "majority vote (round 1)",
    "best-of-N", "consensus", "distinct answers", "3-gram overlap", "cross NLL (off-diag)",
    "selected examples", "finetune loss (mean)")


Table = tuple[list[str], list[list[str]]]   # header, rows of cells


def iteration_rows(run: Run, baselines: Mapping[str, Run] = {}) -> Table:
  """The per-iteration table: header and one row per iteration of the run or
  any baseline (baselines add a round-1 and a debate column each)."""
  n, critics = _agents(run.config)
  by = latest(run.records)
  base_by = {label: latest(b.records) for label, b in baselines.items()}
  header = list(ITERATION_HEADER)
  for label in baselines:
    header += [f"{label}: round 1 (mean)", f"{label}: debate"]
  ks = sorted(set(iterations(run.records)).union(
      *(iterations(b.records) for b in baselines.values())))
  rows = []
  for k in ks:
    ev, sel, ft = by.get((k, "eval")), by.get((k, "select"), {}), by.get((k, "finetune"), {})
    e = ev or {}
    row = [str(k), pct_se(*accuracy(ev, "round1_mean")), per_agent_accuracy(ev, critics),
           pct_se(*accuracy(ev, "debate_accuracy")), pct_se(*accuracy(ev, "majority_accuracy")),
           pct_se(*accuracy(ev, "best_of_n_accuracy")), pct(_num(e.get("consensus_rate"))),
           _fixed(_num(e.get("distinct_answers")), 2), _fixed(_num(e.get("ngram_overlap")), 3),
           _fixed(offdiag_mean(e.get("cross_nll")), 3),
           per_agent_counts(sel.get("selected"), n, critics),
           _fixed(_mean(_nums(ft.get("final_loss"))), 4)]
    for label in baselines:
      be = base_by[label].get((k, "eval")) or {}
      row += [pct_se(*accuracy(be, "round1_mean")), pct_se(*accuracy(be, "debate_accuracy"))]
    rows.append(row)
  return header, rows


def _best_final(series: Mapping[int, float]) -> tuple[str, str]:
  if not series:
    return "-", "-"
  k_last = max(series)
  k_best = max(series, key=lambda k: (series[k], -k))   # earliest best
  return (f"{pct(series[k_last])} (iteration {k_last})",
          f"{pct(series[k_best])} (iteration {k_best})")


def baseline_rows(run: Run, baselines: Mapping[str, Run] = {}) -> Table:
  """The iteration-0 baselines of this run, then this run's and each baseline
  run's final and best accuracy (mean round 1 and debate)."""
  e0 = latest(run.records).get((0, "eval")) or {}
  rows = [
      ["base model", "generators round 1 (mean), iteration 0", pct(round1_mean(e0)), "-"],
      ["majority vote", "round 1, iteration 0", pct(_num(e0.get("majority_accuracy"))), "-"],
      ["debate without finetuning", "debate, iteration 0",
       pct(_num(e0.get("debate_accuracy"))), "-"],
      ["best-of-N with verifier", "round 1, iteration 0",
       pct(_num(e0.get("best_of_n_accuracy"))), "-"],
  ]
  for label, r in [(f"this run ({run.name})", run), *baselines.items()]:
    rows.append([label, "generators round 1 (mean)", *_best_final(_series(run=r, fn=round1_mean))])
    rows.append([label, "debate", *_best_final(_series(run=r, fn=_field("debate_accuracy")))])
  return ["baseline", "metric", "accuracy (final)", "best"], rows


def method_metric(config: Mapping) -> tuple[str, str]:
  """(eval field, its name) that a run's method is judged by: the debate
  when it debates, the majority vote of its N samples when it samples
  several without debate (majority finetuning), else its round-1 accuracy
  (one agent: STaR, rejection-sampling finetuning)."""
  n, _ = _agents(config)
  rounds = (config.get("eval") or {}).get("rounds") if isinstance(config.get("eval"), dict) else None
  if isinstance(rounds, int) and rounds >= 2:
    return "debate_accuracy", "debate"
  if n is not None and n > 1:
    return "majority_accuracy", "majority vote"
  return "round1_mean", "round 1"


def paper_rows(run: Run, baselines: Mapping[str, Run] = {}) -> Table:
  """The paper's Table 1 layout: Base, Majority and Debate (this run's
  iteration 0), each baseline run, then this run; each "acc ± se", at the
  final and the best iteration of the finetuned runs."""
  e0 = latest(run.records).get((0, "eval"))
  rows = [["Base", "round 1 (mean), iteration 0", pct_se(*accuracy(e0, "round1_mean")), "-"],
          ["Majority", "majority vote, iteration 0",
           pct_se(*accuracy(e0, "majority_accuracy")), "-"],
          ["Debate", "debate, iteration 0", pct_se(*accuracy(e0, "debate_accuracy")), "-"]]
  for label, r in [*baselines.items(), (f"{run.name} (this run)", run)]:
    field, name = method_metric(r.config)
    evals = {k: rec for (k, s), rec in latest(r.records).items() if s == "eval"}
    cells = ["-", "-"]
    scored = {k: accuracy(rec, field) for k, rec in evals.items()}
    scored = {k: v for k, v in scored.items() if v[0] is not None}
    if scored:
      k_last = max(scored)
      k_best = max(scored, key=lambda k: (scored[k][0], -k))   # earliest best
      cells = [f"{pct_se(*scored[k_last])} (iteration {k_last})",
               f"{pct_se(*scored[k_best])} (iteration {k_best})"]
    rows.append([label, name, *cells])
  return ["method", "metric", "accuracy ± s.e. (final)", "best"], rows


def data_rows(run: Run) -> Table:
  """Per-iteration selection counts (total (per agent)) and consensus accuracy."""
  rows = []
  for (k, stage), r in sorted(latest(run.records).items()):
    if stage != "select":
      continue
    rows.append([str(k), str(r.get("mode", "-")), _total(r.get("d_g")), _total(r.get("d_c_minus")),
                 _total(r.get("d_c_plus")), _total(r.get("d_c_kept")),
                 pct(_num(r.get("consensus_accuracy")))])
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
  lines += _table(*iteration_rows(run, baselines))
  lines += ["", "## As in the paper's Table 1", "",
            "Accuracy ± its standard error on the n held-out problems: binomial, "
            "sqrt(p(1-p)/n); for a mean over generators, over problems of their per-problem "
            "mean. Base, Majority and "
            "Debate are this run's iteration 0; each other row is a run at its final and its "
            "best iteration.", ""]
  lines += _table(*paper_rows(run, baselines))
  lines += ["", "## Baselines", ""]
  lines += _table(*baseline_rows(run, baselines))
  lines += ["", "## Data", "",
            "Selected finetuning examples per iteration: total (per agent).", ""]
  header, rows = data_rows(run)
  lines += _table(header, rows) if rows else ["No selection records yet."]
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


def _plot(ax, series: Mapping[int, float], scale: float = 1, **kw) -> None:
  """One line (with markers, so a single iteration shows) unless empty."""
  if series:
    xs = sorted(series)
    ax.plot(xs, [series[k] * scale for k in xs], marker="o", **kw)


def _band(ax, run: Run, field: str, color: str) -> None:
  """A shaded band of ± one standard error around an accuracy series."""
  points = {k: accuracy(r, field) for (k, st), r in sorted(latest(run.records).items())
            if st == "eval"}
  points = {k: v for k, v in points.items() if v[0] is not None and v[1] is not None}
  if points:
    xs = sorted(points)
    ax.fill_between(xs, [100 * (points[k][0] - points[k][1]) for k in xs],
                    [100 * (points[k][0] + points[k][1]) for k in xs], color=color, alpha=0.15,
                    lw=0)


def _integer_x(ax) -> None:
  from matplotlib.ticker import MaxNLocator
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_xlabel("iteration")


def _agent_field(name: str, i: int) -> Callable[[Mapping], float | None]:
  """record -> record[name][i] as a float, or None."""
  def get(r: Mapping) -> float | None:
    values = _nums(r.get(name)) or []
    return values[i] if i < len(values) else None
  return get


def plot_accuracy(run: Run, path: str, baselines: Mapping[str, Run] = {}) -> None:
  fig, (ax,) = _figure(1, 1, (7.5, 4.8))
  n_gen = max((len(r["round1_accuracy"]) for r in run.records
               if r["stage"] == "eval" and isinstance(r.get("round1_accuracy"), list)), default=0)
  for i in range(n_gen):
    _plot(ax, _series(run, _agent_field("round1_accuracy", i)), scale=100, lw=0.8, alpha=0.5,
          ms=2, label=f"generator {i} (round 1)")
  _plot(ax, _series(run, round1_mean), scale=100, lw=1.8, color="C0",
        label="generators round 1 (mean)")
  _plot(ax, _series(run, _field("majority_accuracy")), scale=100, lw=1.5, color="C2",
        label="majority vote (round 1)")
  _plot(ax, _series(run, _field("debate_accuracy")), scale=100, lw=3, color="C3",
        label="debate (bands: ± 1 s.e.)")
  for field, color in (("round1_mean", "C0"), ("majority_accuracy", "C2"),
                       ("debate_accuracy", "C3")):
    _band(ax, run, field, color)
  best0 = _num((latest(run.records).get((0, "eval")) or {}).get("best_of_n_accuracy"))
  if best0 is not None:
    ax.axhline(100 * best0, color="k", ls=":", lw=1.2, label="best-of-N, iteration 0")
  for j, (label, b) in enumerate(baselines.items()):
    color = f"C{4 + j % 6}"
    _plot(ax, _series(b, round1_mean), scale=100, ls="--", lw=1, ms=3, color=color,
          alpha=0.7, label=f"{label}: round 1 (mean)")
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
  nll = _series(run, lambda r: offdiag_mean(r.get("cross_nll")))
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


def scalars(records: Iterable[dict]) -> list[tuple[str, float, int]]:
  """(tag, value, step=iteration) of every number in the records: fields as
  `stage/field`, per-agent lists as `stage/field/agent_i`, plus
  `eval/round1_accuracy_mean` and `eval/cross_nll_offdiag`."""
  out = []
  for (k, stage), r in sorted(latest(records).items()):
    for field, value in r.items():
      if field in ("iteration", "stage"):
        continue
      if (v := _num(value)) is not None:
        out.append((f"{stage}/{field}", v, k))
      elif isinstance(value, list) and not any(isinstance(x, list) for x in value):
        out += [(f"{stage}/{field}/agent_{i}", x, k)
                for i, x in enumerate(_nums(value)) if x is not None]
    if stage == "eval":
      for tag, v in (("eval/round1_accuracy_mean", round1_mean(r)),
                     ("eval/cross_nll_offdiag", offdiag_mean(r.get("cross_nll")))):
        if v is not None:
          out.append((tag, v, k))
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


def write_tensorboard(workdir: str, records: Iterable[dict], logdir: str | None = None,
                      ) -> str | None:
  """Rewrite the event files under logdir (default workdir/tb) from the
  records, so that a resumed run never duplicates points. Returns logdir, or
  None (with a warning) when tensorboardX is not installed."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    logging.warning("tensorboardX is not installed (pip install tensorboardX): "
                    "no TensorBoard events written")
    return None
  logdir = logdir or os.path.join(workdir, TB_DIR)
  points = scalars(records)
  _remove_event_files(logdir)
  writer = SummaryWriter(logdir)
  try:
    for tag, value, step in points:
      writer.add_scalar(tag, value, global_step=step)
  finally:
    writer.close()
  return logdir


# ----------------------------------------------------------------------------- console

def _pct_or_dash(x) -> str:
  return "   -  " if x is None else f"{100 * x:5.1f}%"


def _pct_se(record, field: str) -> str:
  return pct_se(*accuracy(record, field))


def console_table(records: Sequence[Mapping[str, Any]], generators: int) -> str:
  """The per-iteration table printed after every iteration; accuracies carry
  ± their standard error (percentage points)."""
  evals = {r["iteration"]: r for r in records if r["stage"] == "eval"}
  sel = {r["iteration"]: r for r in records if r["stage"] == "select"}
  lines = [f"{'iter':>4}  {'agents (round 1)':<{7 * generators}}  {'mean':>12}  "
           f"{'majority':>12}  {'debate':>12}  {'best-of-N':>12}  {'consensus':>9}  selected"]
  for k in sorted(evals):
    e = evals[k]
    accs = e.get("round1_accuracy", [])
    lines.append(
        f"{k:>4}  {' '.join(_pct_or_dash(x) for x in accs):<{7 * generators}}  "
        f"{_pct_se(e, 'round1_mean'):>12}  {_pct_se(e, 'majority_accuracy'):>12}  "
        f"{_pct_se(e, 'debate_accuracy'):>12}  {_pct_se(e, 'best_of_n_accuracy'):>12}  "
        f"{_pct_or_dash(e.get('consensus_rate')):>9}  {sel[k]['selected'] if k in sel else '-'}")
  return "\n".join(lines)
