"""maft_jax.report and launch.report on hand-written run directories.

The expected cells are computed by hand from the records below, so a wrong
mean, a diagonal counted in the cross NLL, or a stale (pre-resume) record
makes these tests fail.
"""

import json
import logging
import os
import struct
import sys

import pytest

from maft_jax import report
from tests import cli

N = 3
A = 2 * N


def _cross_nll(offdiag_row0: float, offdiag: float) -> list[list[float]]:
  """A x A with a large diagonal (must be ignored)."""
  return [[100.0 if i == j else (offdiag_row0 if i == 0 else offdiag) for j in range(A)]
          for i in range(A)]


def _bse(p, n=100):
  return (p * (1 - p) / n) ** 0.5


def _eval(k, round1, final, debate, *, majority=0.3, best=0.6, consensus=0.7, distinct=1.5,
          overlap=0.2, cross_nll=None):
  """A whole eval record (binomial errors over 100 problems)."""
  mean = sum(round1) / len(round1)
  r = {"version": 1, "iteration": k, "stage": "eval", "seconds": 1.5, "problems": 100,
       "round1_mean_accuracy": mean, "round1_mean_accuracy_se": _bse(mean),
       "round1_accuracy": round1, "round1_accuracy_se": [_bse(p) for p in round1],
       "final_accuracy": final, "final_accuracy_se": [_bse(p) for p in final],
       "debate_accuracy": debate, "debate_accuracy_se": _bse(debate),
       "majority_accuracy": majority, "majority_accuracy_se": _bse(majority),
       "best_of_n_accuracy": best, "best_of_n_accuracy_se": _bse(best),
       "consensus_rate": consensus, "distinct_answers": distinct, "ngram_overlap": overlap}
  if cross_nll is not None:
    r.update(cross_nll=cross_nll, cross_nll_problems=20)
  return r


def _select(k, selected, d_g, d_c_minus, d_c_plus, d_c_kept, consensus):
  return {"version": 1, "iteration": k, "stage": "select", "mode": "paper", "problems": 50,
          "selected": selected, "d_g": d_g, "d_c_minus": d_c_minus, "d_c_plus": d_c_plus,
          "d_c_kept": d_c_kept, "consensus_accuracy": consensus, "consensus_rate": 0.9,
          "seconds": 0.1}


def _debate(k, responses):
  return {"version": 1, "iteration": k, "stage": "debate", "problems": 50,
          "responses": responses, "seconds": 3.0}


def _finetune(k, final_loss):
  return {"version": 1, "iteration": k, "stage": "finetune", "examples": [12, 10, 9, 8, 7, 6],
          "steps": [3, 3, 3, 2, 2, 2], "final_loss": final_loss, "tokens": 5000, "seconds": 9.0}


RECORDS = [
    _eval(0, [0.40, 0.42, 0.44], [0.50, 0.48, 0.47], 0.46, majority=0.44, best=0.70,
          consensus=0.80, distinct=1.75, overlap=0.3, cross_nll=_cross_nll(2.5, 2.5)),
    _debate(1, 1000),
    _select(1, [12, 10, 9, 8, 7, 6], [4, 5, 6], [1, 2, 3], [3, 2, 1], [2, 2, 2], 0.75),
    _finetune(1, [0.5, None, 0.7, 0.9, 1.1, 1.3]),
    # Logged before a crash, then again after the resume: the later one counts.
    _eval(1, [0.10, 0.10, 0.10], [0.10, 0.10, 0.10], 0.10),
    _eval(1, [0.45, 0.47, 0.52], [0.55, 0.50, 0.51], 0.52, majority=0.50, best=0.65,
          consensus=0.85),                         # no cross-agent NLL computed
    _debate(2, 900),
    _select(2, [11, 11, 11, 5, 5, 5], [7, 8, 9], [0, 1, 0], [2, 2, 2], [1, 1, 1], 0.8),
    _finetune(2, [0.2, 0.2, 0.2, 0.4, 0.4, 0.4]),
    _eval(2, [0.50, 0.51, 0.53], [0.56, 0.57, 0.58], 0.55, majority=0.53, best=0.75,
          consensus=0.9, distinct=1.25, overlap=0.45, cross_nll=_cross_nll(3.6, 3.0)),
]

BASELINE_RECORDS = [_eval(0, [0.40], [0.40], 0.40), _eval(1, [0.47], [0.47], 0.46),
                    _eval(2, [0.45], [0.45], 0.44)]


def _workdir(path, records, *, generators=N, critics=True, name="maft-demo", rounds=2):
  os.makedirs(path, exist_ok=True)
  config = {"agents": {"generators": generators, "critics": critics}, "iterations": 2,
            "task": {"name": "arithmetic"}, "eval": {"rounds": rounds}}
  if name:
    config["name"] = name
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


@pytest.fixture
def run_dir(tmp_path):
  return _workdir(tmp_path / "run", RECORDS)


@pytest.fixture
def baseline_dir(tmp_path):
  return _workdir(tmp_path / "star", BASELINE_RECORDS, generators=1, critics=False, name=None,
                  rounds=1)


def _table(text: str, section: str) -> list[dict[str, str]]:
  """The first markdown table after `## section`, as header -> cell dicts."""
  lines = text.split(f"## {section}\n", 1)[1].splitlines()
  end = next((i for i, line in enumerate(lines) if line.startswith("## ")), len(lines))
  rows = [line for line in lines[:end] if line.startswith("|")]

  def cells(line):
    return [c.strip() for c in line.strip().strip("|").split(" | ")]
  header = cells(rows[0])
  assert set(rows[1]) <= set("|-"), rows[1]
  return [dict(zip(header, cells(r), strict=True)) for r in rows[2:]]


def _se(p, n):
  """A cell 'acc% ± se' with se = sqrt(p(1-p)/n), in percentage points."""
  return f"{100 * p:.1f}% ± {100 * (p * (1 - p) / n) ** 0.5:.1f}"


def _assert_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  assert os.path.getsize(path) > 1000, path


def test_report_tables(run_dir, baseline_dir, tmp_path):
  out = str(tmp_path / "out")
  paths = report.write(run_dir, baselines={"single-agent FT": baseline_dir}, out_dir=out)
  assert paths == [os.path.join(out, n) for n in ("report.md", "accuracy.png", "diversity.png")]
  for p in paths[1:]:
    _assert_png(p)
  assert not os.path.exists(os.path.join(run_dir, "report.md"))
  text = open(paths[0]).read()
  assert text.startswith("# maft-demo: arithmetic\n")
  assert os.path.abspath(run_dir) in text.split("## Provenance", 1)[1]

  rows = {r["iteration"]: r for r in _table(text, "Per iteration")}
  assert list(rows) == ["0", "1", "2"]
  r0, r1, r2 = rows["0"], rows["1"], rows["2"]
  assert r0["generators round 1 (mean)"] == _se(0.42, 100)
  assert r0["per agent"] == "G .40 .42 .44 / C .50 .48 .47"
  assert r0["debate"] == _se(0.46, 100) and r0["majority vote (round 1)"] == _se(0.44, 100)
  assert r0["best-of-N"] == _se(0.70, 100) and r0["consensus"] == "80.0%"
  assert r0["distinct answers"] == "1.75" and r0["3-gram overlap"] == "0.300"
  assert r0["cross NLL (off-diag)"] == "2.500"
  assert r0["selected examples"] == "-" and r0["finetune loss (mean)"] == "-"
  # Iteration 1: the resumed record wins; no cross NLL is "-"; null loss skipped.
  assert r1["generators round 1 (mean)"] == _se(0.48, 100) and r1["debate"] == _se(0.52, 100)
  assert r1["per agent"] == "G .45 .47 .52 / C .55 .50 .51"
  assert r1["best-of-N"] == _se(0.65, 100) and r1["3-gram overlap"] == "0.200"
  assert r1["cross NLL (off-diag)"] == "-"
  assert r1["selected examples"] == "G 12 10 9 / C 8 7 6"
  assert r1["finetune loss (mean)"] == "0.9000"
  assert r2["debate"] == _se(0.55, 100)
  assert r2["generators round 1 (mean)"] == _se((0.50 + 0.51 + 0.53) / 3, 100)
  assert r2["cross NLL (off-diag)"] == "3.100"           # (5 * 3.6 + 25 * 3.0) / 30
  assert r2["finetune loss (mean)"] == "0.3000"
  assert r2["consensus"] == "90.0%" and r2["distinct answers"] == "1.25"
  assert r2["selected examples"] == "G 11 11 11 / C 5 5 5"
  assert [rows[k]["single-agent FT: debate"] for k in "012"] == [
      _se(p, 100) for p in (0.40, 0.46, 0.44)]
  assert rows["1"]["single-agent FT: round 1 (mean)"] == _se(0.47, 100)

  # The paper's layout: Base, Majority, Debate at iteration 0, then each run
  # by the metric its method is judged by (one agent: round 1; MAFT: debate).
  paper = {r["method"]: r for r in _table(text, "As in the paper's Table 1")}
  assert list(paper) == ["Base", "Majority", "Debate", "single-agent FT", "maft-demo (this run)"]
  assert paper["Base"]["accuracy ± s.e. (final)"] == _se(0.42, 100)
  assert paper["Majority"]["accuracy ± s.e. (final)"] == _se(0.44, 100)
  assert paper["Debate"]["accuracy ± s.e. (final)"] == _se(0.46, 100)
  star = paper["single-agent FT"]
  assert star["metric"] == "round 1"
  assert star["accuracy ± s.e. (final)"] == _se(0.45, 100) + " (iteration 2)"
  assert star["best"] == _se(0.47, 100) + " (iteration 1)"
  ours = paper["maft-demo (this run)"]
  assert ours["metric"] == "debate" and ours["best"] == _se(0.55, 100) + " (iteration 2)"

  base = {(r["baseline"], r["metric"]): r for r in _table(text, "Baselines")}
  assert base["base model", "generators round 1 (mean), iteration 0"]["accuracy (final)"] == "42.0%"
  assert base["majority vote", "round 1, iteration 0"]["accuracy (final)"] == "44.0%"
  assert base["debate without finetuning", "debate, iteration 0"]["accuracy (final)"] == "46.0%"
  assert base["best-of-N with verifier", "round 1, iteration 0"]["accuracy (final)"] == "70.0%"
  star = base["single-agent FT", "debate"]
  assert star["accuracy (final)"] == "44.0% (iteration 2)"
  assert star["best"] == "46.0% (iteration 1)"
  assert base["single-agent FT", "generators round 1 (mean)"]["best"] == "47.0% (iteration 1)"
  assert base["this run (maft-demo)", "debate"]["best"] == "55.0% (iteration 2)"

  data = {r["iteration"]: r for r in _table(text, "Data")}
  assert list(data) == ["1", "2"]
  assert data["1"]["D^G"] == "15 (4 5 6)" and data["1"]["D^C-"] == "6 (1 2 3)"
  assert data["1"]["D^C+"] == "6 (3 2 1)" and data["1"]["kept"] == "6 (2 2 2)"
  assert data["1"]["consensus accuracy"] == "75.0%"
  assert data["2"]["D^G"] == "24 (7 8 9)" and data["2"]["consensus accuracy"] == "80.0%"


def test_report_with_only_iteration_0(tmp_path):
  workdir = _workdir(tmp_path / "fresh", [_eval(0, [0.25, 0.5], [0.5, 0.5], 0.5)],
                     generators=2, critics=False, name=None)
  paths = report.write(workdir)
  for p in paths[1:]:
    _assert_png(p)
  text = open(paths[0]).read()
  assert text.startswith("# fresh: arithmetic\n")
  (row,) = _table(text, "Per iteration")
  assert row["generators round 1 (mean)"] == _se(0.375, 100) and row["per agent"] == "G .25 .50"
  assert row["majority vote (round 1)"] == _se(0.3, 100) and row["cross NLL (off-diag)"] == "-"
  assert "No selection records yet." in text


def test_read_run_errors(tmp_path):
  with pytest.raises(report.ReportError, match="no such run directory"):
    report.read_run(str(tmp_path / "missing"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(report.ReportError, match="metrics.jsonl: not found"):
    report.read_run(str(tmp_path / "empty"))
  workdir = _workdir(tmp_path / "bad", RECORDS[:1])
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "a") as f:
    f.write('{"iteration": 1, "stage": "eval", "round1_acc\n')
  with pytest.raises(report.ReportError, match=f"^{path}:2: malformed record \\(not valid JSON"):
    report.read_run(workdir)
  def third_line(record):
    with open(path, "w") as f:
      f.write(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(record) + "\n")
    return f"^{path}:3: "
  with pytest.raises(report.ReportError, match=third_line({"version": 1, "stage": "eval"})
                     + "'iteration'"):
    report.read_run(workdir)
  with pytest.raises(report.ReportError, match=third_line(dict(RECORDS[0], version=2))
                     + "record format version 2; this maft_jax reads version 1"):
    report.read_run(workdir)
  no_debate = {k: v for k, v in RECORDS[0].items() if k != "debate_accuracy"}
  with pytest.raises(report.ReportError, match=third_line(no_debate)
                     + "the eval record has no 'debate_accuracy'"):
    report.read_run(workdir)
  with pytest.raises(report.ReportError, match=third_line(dict(RECORDS[0], round1_accuracy=[0.4, "x"]))
                     + r"eval field 'round1_accuracy' must be list\[float\]"):
    report.read_run(workdir)
  with pytest.raises(report.ReportError, match=third_line(dict(RECORDS[1], stage="vote"))
                     + "'stage' must be one of debate, select, finetune, eval"):
    report.read_run(workdir)
  with pytest.raises(report.ReportError, match=third_line(dict(RECORDS[1], tokens=3))
                     + r"unknown debate field\(s\) \['tokens'\]"):
    report.read_run(workdir)
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(report.ReportError, match="config.json: missing"):
    report.read_run(workdir)


def test_missing_optional_packages(run_dir, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
  with pytest.raises(report.ReportError, match="pip install matplotlib"):
    report.write(run_dir)
  monkeypatch.setitem(sys.modules, "tensorboardX", None)
  with caplog.at_level(logging.WARNING):
    assert report.write_tensorboard(run_dir, report.read_run(run_dir).records) is None
  assert "tensorboardX" in caplog.text and not os.path.exists(os.path.join(run_dir, "tb"))


def _tfrecords(path: str) -> list[bytes]:
  """The payloads of a TFRecord file: u64 length, u32 crc, data, u32 crc."""
  out = []
  with open(path, "rb") as f:
    while header := f.read(12):
      (length,) = struct.unpack("<Q", header[:8])
      out.append(f.read(length))
      assert len(f.read(4)) == 4
  return out


def _events(logdir: str) -> list[tuple[str, int, float]]:
  from tensorboardX.proto import event_pb2
  files = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents.")]
  assert len(files) == 1, files
  out = []
  for data in _tfrecords(os.path.join(logdir, files[0])):
    event = event_pb2.Event.FromString(data)
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
  return out


def test_tensorboard_is_rewritten(run_dir):
  pytest.importorskip("tensorboardX")
  done = report.read_run(run_dir).records
  logdir = report.write_tensorboard(run_dir, done)
  assert logdir == os.path.join(run_dir, "tb")
  first = _events(logdir)
  assert report.write_tensorboard(run_dir, done) == logdir
  second = _events(logdir)
  assert len(first) == len(second) and sorted(first) == sorted(second)
  values = {(tag, step): v for tag, step, v in second}
  assert len(values) == len(second)                      # no duplicated points
  assert [s for t, s, _ in second if t == "eval/debate_accuracy"] == [0, 1, 2]
  assert values["eval/debate_accuracy", 1] == pytest.approx(0.52)
  assert values["eval/round1_accuracy/agent_2", 2] == pytest.approx(0.53)
  assert values["select/selected/agent_3", 1] == 8
  assert values["finetune/final_loss/agent_0", 1] == pytest.approx(0.5)
  assert ("finetune/final_loss/agent_1", 1) not in values    # null
  assert values["eval/cross_nll_offdiag", 2] == pytest.approx(3.1)
  assert values["debate/responses", 2] == 900
  assert values["finetune/seconds", 1] == 9.0 and values["eval/seconds", 1] == 1.5


def test_cli(run_dir, baseline_dir, tmp_path):
  out = str(tmp_path / "cli_out")
  proc = cli.run("report", f"--workdir={run_dir}", f"--baseline=single-agent FT={baseline_dir}",
                 f"--out_dir={out}")
  assert proc.stdout.split() == [os.path.join(out, n)
                                 for n in ("report.md", "accuracy.png", "diversity.png")]
  assert "| single-agent FT | debate | 44.0% (iteration 2) |" in open(proc.stdout.split()[0]).read()
  bad = cli.run("report", f"--workdir={run_dir}", f"--baseline={baseline_dir}", check=False)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines() == [
      f"error: --baseline={baseline_dir!r}: expected LABEL=DIR"]
  missing = cli.run("report", f"--workdir={tmp_path / 'nope'}", check=False)
  assert missing.returncode != 0
  assert missing.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run directory"
