"""launch.train end to end on configs/demo.py:smoke: two MAFT iterations (one run,
shared by the tests that read it), resume semantics (a rerun does nothing, a
changed config is refused, a run killed between stages and mid-finetune resumes
to the same result), STaR through the same loop, one-line config errors, the
memory plan (--dry_run), two processes as one program; launch.evaluate on a
run's workdir."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from maft_jax import checkpoint, config, presets, sharding

from launch import common
from tests import cli, once
from tests.reference import same_update


CONFIG = "--config=configs/demo.py:smoke"


def _kill_when(workdir, ready, *flags, timeout=240):
  """Start launch.train; SIGKILL it as soon as `ready()` holds."""
  proc = cli.start("train", CONFIG, *flags, f"--workdir={workdir}", "--config.finetune.save_every=1",
                   "--noprogress", "--noreport", stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  try:
    while not ready():
      assert proc.poll() is None, "launch.train ended before the kill point"
      assert time.time() < deadline, "kill point never reached"
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
  """Two MAFT iterations of configs/demo.py:smoke, run once for the tests below."""
  return once.finished_run(tmp_path_factory, "smoke", CONFIG, "--noprogress")


def test_smoke_run_records_checkpoints_and_report(smoke_run):
  work = smoke_run
  records = cli.records(work)
  assert [(r["iteration"], r["stage"]) for r in records] == [
      (0, "eval"), (1, "debate"), (1, "select"), (1, "finetune"), (1, "eval"),
      (2, "debate"), (2, "select"), (2, "finetune"), (2, "eval")]
  A, N = 4, 2
  for r in records:
    if r["stage"] == "eval":
      assert len(r["round1_accuracy"]) == N and len(r["final_accuracy"]) == N
      assert all(0 <= x <= 1 for x in r["round1_accuracy"] + [r["debate_accuracy"]])
      assert len(r["cross_nll"]) == A and all(len(row) == A for row in r["cross_nll"])
      assert all(x > 0 for row in r["cross_nll"] for x in row)
    if r["stage"] == "select":
      assert len(r["selected"]) == A
      assert r["selected"][:N] == r["d_g"]
      assert [r["selected"][N + n] for n in range(N)] == [
          m + k for m, k in zip(r["d_c_minus"], r["d_c_kept"])]
    if r["stage"] == "finetune":
      # An agent with examples updates; one without takes no step.
      select = next(s for s in records if s["stage"] == "select" and
                    s["iteration"] == r["iteration"])
      assert r["examples"] == select["selected"]
      assert [s > 0 for s in r["steps"]] == [e > 0 for e in r["examples"]]
  # What each select stage wrote follows from its debate's transcript.
  from maft_jax.tokenizer import Tokenizer
  from tests.maft_jax.test_selection import check_stage_records
  tok = Tokenizer(os.path.join(work, "demo_base"))
  for k in (1, 2):
    check_stage_records(work, k, critic_weight=0.5, tokenizer=tok)
  # The table is printed after every evaluation.
  with open(os.path.join(work, "stdout.txt")) as f:
    assert f.read().count("iteration  per agent") == 3
  # Checkpoint contents: the population of each iteration, loadable, with its tokenizer.
  pop_dir = os.path.join(work, "iter_02", "finetune", "population")
  with open(os.path.join(pop_dir, "maft.json")) as f:
    assert json.load(f)["num_agents"] == A
  assert os.path.isfile(os.path.join(pop_dir, "tokenizer", "tokenizer.json"))
  with open(os.path.join(work, "iter_01", "select", "agent_0.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == records[2]["selected"][0]
  with open(os.path.join(work, "iter_02", "eval", "debate.json")) as f:
    transcript = json.load(f)
  assert len(transcript["texts"]) == 2 and len(transcript["texts"][0]) == N
  assert not os.path.exists(os.path.join(work, "iter_01", "finetune_state"))
  # Report files and TensorBoard events.
  for name in ("report.md", "accuracy.png", "diversity.png"):
    assert os.path.getsize(os.path.join(work, name)) > 0
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(work, "tb")))


def test_rerun_does_nothing_and_a_changed_config_is_refused(smoke_run, tmp_path):
  work = str(tmp_path / "run")
  shutil.copytree(smoke_run, work)
  records = cli.records(work)
  # A rerun finds every stage done: same records, nothing recomputed.
  cli.run("train", CONFIG, f"--workdir={work}", "--noprogress", "--noreport")
  assert cli.records(work) == records
  # A changed config is refused, naming the field; more iterations would be accepted.
  changed = cli.run("train", CONFIG, f"--workdir={work}", "--config.debate.rounds=3",
                    check=False)
  assert changed.returncode != 0 and "debate.rounds was 2, now 3" in changed.stderr


def test_evaluate_reproduces_the_runs_evaluation(smoke_run, tmp_path):
  work, final_eval = smoke_run, cli.records(smoke_run, timing=False)[-1]
  # launch.evaluate on the run's last population reproduces the run's own evaluation.
  out = tmp_path / "eval.json"
  cli.run("evaluate", f"--workdir={work}", f"--output={out}")
  evaluated = json.loads(out.read_text())
  for key in ("round1_accuracy", "final_accuracy", "debate_accuracy", "consensus_rate",
              "distinct_answers", "ngram_overlap", "cross_nll"):
    assert evaluated[key] == final_eval[key], key
  # So does launch.evaluate on the population checkpoint with the run's config.
  out2 = tmp_path / "eval_ckpt.json"
  pop_dir = os.path.join(work, "iter_02", "finetune", "population")
  cli.run("evaluate", CONFIG, f"--checkpoint={pop_dir}", f"--output={out2}")
  from_checkpoint = json.loads(out2.read_text())
  for key in ("round1_accuracy", "debate_accuracy", "cross_nll"):
    assert from_checkpoint[key] == final_eval[key], key


def test_killed_between_stages_and_mid_finetune_resumes_to_the_same_records(smoke_run,
                                                                            tmp_path):
  """Killed twice -- between stages, as iteration 1 starts its debate, and in
  the middle of its finetuning (after a training checkpoint) -- and resumed
  each time, the run ends exactly where the uninterrupted run ended. (A kill
  between iterations is a kill between stages, as the first one.)"""
  killed = str(tmp_path / "killed")
  shutil.copytree(os.path.join(smoke_run, "demo_base"), os.path.join(killed, "demo_base"))
  it1 = lambda stage: os.path.join(killed, "iter_01", stage)  # noqa: E731
  _kill_when(killed, lambda: os.path.isdir(os.path.join(killed, "iter_00", "eval")))
  assert not os.path.exists(it1("debate"))         # killed before the debate was written
  state = it1("finetune_state")
  _kill_when(killed, lambda: os.path.isdir(state) and any(n.isdigit() for n in os.listdir(state)))
  assert os.path.isdir(it1("select")) and not os.path.exists(it1("finetune"))
  cli.run("train", CONFIG, f"--workdir={killed}", "--config.finetune.save_every=1",
          "--noprogress", "--noreport")
  assert cli.records(killed, timing=False) == cli.records(smoke_run, timing=False)


LORA = "--config.finetune.lora_rank=4"  # finetune.init=previous: adapters continue


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
  """configs/demo.py:smoke with LoRA: one base, stacked adapters."""
  return once.finished_run(tmp_path_factory, "lora", CONFIG, LORA, "--noprogress")


def test_lora_run_holds_one_base_continues_adapters_and_resumes_after_a_kill(lora_run, tmp_path):
  from maft_jax import hf, loop, population, stages
  work = lora_run
  records = cli.records(work, timing=False)
  pop_dir = lambda k: os.path.join(work, f"iter_{k:02d}", "finetune", "population")  # noqa
  base_dir = os.path.join(work, "demo_base")
  base_bytes = sum(os.path.getsize(f) for f in hf.weight_files(base_dir))
  # Each iteration's checkpoint: the adapters and a reference to the run's base.
  for k in (1, 2):
    meta = checkpoint.read_meta(pop_dir(k))
    assert meta.lora["rank"] == 4 and meta.base_ref.path == base_dir
    assert sorted(os.listdir(pop_dir(k))) == ["maft.json", "params", "tokenizer"]
    params_bytes = sum(os.path.getsize(os.path.join(r, n))
                       for r, _, ns in os.walk(os.path.join(pop_dir(k), "params")) for n in ns)
    assert params_bytes < base_bytes  # 4 agents' adapters, not 4 copies of the base

  # A copy (the stages below write training checkpoints into its workdir),
  # which also finds its base by the references' relative paths.
  copy = str(tmp_path / "copy")
  shutil.copytree(work, copy)
  plan = config.validate(json.loads(pathlib.Path(copy, "config.json").read_text()))
  env = stages.Env(plan, copy, loop.base_source(plan, copy, progress=False), progress=False)
  pop_dir = lambda k: os.path.join(copy, f"iter_{k:02d}", "finetune", "population")  # noqa
  with env.placement.context():
    # Iteration 2 trained iteration 1's adapters further (init=previous):
    # its finetune stage, redone from them, gives the saved adapters; from the
    # base population's adapters it would not.
    saved = env.load_checkpoint(pop_dir(2))
    assert checkpoint.read_meta(pop_dir(2)).base_ref.path == os.path.join(copy, "demo_base")
    state = os.path.join(copy, "iter_02", "finetune_state")
    redo, again = tmp_path / "redo", tmp_path / "from_base"
    for d in (redo, again):
      d.mkdir()
    record, pop2 = stages.finetune(env, 2, env.load_checkpoint(pop_dir(1)), str(redo))
    shutil.rmtree(state)
    assert isinstance(pop2, population.Adapted) and pop2.base is saved.base  # held once
    assert records[7]["final_loss"] == pytest.approx(record.final_loss, rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), pop2.adapters,
                 saved.adapters)
    _, other = stages.finetune(env, 2, env.load_base(), str(again))
    shutil.rmtree(state)
    trained = [a for a, e in enumerate(records[7]["examples"]) if e]
    assert trained and not any(
        np.array_equal(np.asarray(x)[a], np.asarray(y)[a]) for a in trained
        for x, y in zip(jax.tree.leaves(other.adapters), jax.tree.leaves(saved.adapters)))
  # Its evaluation was that of the merged agents (the saved adapters folded
  # into the base): launch.evaluate of the checkpoint under a config without
  # LoRA merges them.
  out = tmp_path / "eval.json"
  cli.run("evaluate", CONFIG, f"--checkpoint={pop_dir(2)}", f"--output={out}")
  got, want = json.loads(out.read_text()), records[8]
  for key in ("round1_accuracy", "final_accuracy", "debate_accuracy", "consensus_rate",
              "distinct_answers"):
    assert got[key] == want[key], key
  np.testing.assert_allclose(got["cross_nll"], want["cross_nll"], rtol=1e-5)
  # Its adapters in the PEFT format, over the base written beside them.
  cli.run("export_hf", f"--checkpoint={pop_dir(2)}", "--agent=3", "--format=peft",
          f"--out={tmp_path / 'peft'}")
  assert sorted(os.listdir(tmp_path / "peft")) == ["adapter", "base"]
  assert (tmp_path / "peft" / "adapter" / "adapter_model.safetensors").is_file()

  # Killed in iteration 2's finetuning and resumed: the same records.
  killed = copy
  for stage in ("finetune", "eval"):
    shutil.rmtree(os.path.join(killed, "iter_02", stage))
  state = os.path.join(killed, "iter_02", "finetune_state")
  _kill_when(killed, lambda: os.path.isdir(state) and any(n.isdigit() for n in os.listdir(state)),
             LORA)
  assert not os.path.exists(os.path.join(killed, "iter_02", "finetune"))
  cli.run("train", CONFIG, LORA, f"--workdir={killed}", "--noprogress", "--noreport")
  assert cli.records(killed, timing=False) == records


def test_star_through_launch_train(tmp_path):
  """STaR through the same loop: the debate stage rationalises every failure
  with the answer as a hint; the select stage keeps only verified rationales,
  under the prompt without the hint."""
  star = str(tmp_path / "star")
  cli.run("train", CONFIG + ",star", f"--workdir={star}", "--config.iterations=1",
          "--noprogress", "--noreport")
  with open(os.path.join(star, "iter_01", "debate", "debate.json")) as f:
    transcript = json.load(f)
  r = transcript["rationales"]
  from maft_jax import tasks
  task = tasks.load("arithmetic", size=4000, seed=0, max_value=3)
  by_id = {p.id: p for p in task.problems()}
  problems = [by_id[i] for i in transcript["problem_ids"]]
  first = [task.is_correct(t, p) for t, p in zip(transcript["texts"][0][0], problems)]
  assert [t is not None for t in r["texts"][0]] == [not ok for ok in first]
  for b, msgs in enumerate(r["messages"][0]):
    if msgs is not None:
      assert f"Hint: the correct answer is {problems[b].reference}." in msgs[0]["content"]
  with open(os.path.join(star, "iter_01", "select", "agent_0.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  summary = cli.records(star)[2]
  assert summary["stage"] == "select" and len(rows) == summary["d_g"][0] + \
      summary["rationales_kept"][0] == sum(first) + summary["rationales_kept"][0]
  for row in rows:
    assert "Hint" not in row["prompt"]
    b = next(b for b, p in enumerate(problems) if p.question in row["prompt"])
    assert task.is_correct(row["completion"], problems[b])


def test_train_config_errors_are_one_line(tmp_path, monkeypatch):
  """One launch.train: a value the config check refuses is one line, not a
  traceback, and nothing is written. The errors of flag parsing (an unknown
  field, a config file that raises) come from the same `parse_flags` that
  launch.train calls, checked here in process."""
  work = tmp_path / "w"
  proc = cli.run("train", CONFIG, f"--workdir={work}", "--config.debate.rounds=0", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.debate.rounds=0: must be >= 1"), proc.stderr[-2000:]
  assert not os.path.exists(work)   # nothing was written or built
  monkeypatch.chdir(cli.ROOT)
  for args, message in [((CONFIG, "--config.debate.roundz=3"), "unknown config field 'roundz'"),
                        (("--config=configs/demo.py:bogus",), "variant='bogus'")]:
    with pytest.raises(SystemExit) as e:
      _parse(*args)
    assert str(e.value).startswith("error: ") and message in str(e.value), args
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value), args


def _parse(*args):
  """launch.common.parse_flags on a fresh flag set holding --config."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv)
  common.parse_flags(["prog", *args], flag_values=fv)
  return fv.config


def test_task_options_from_the_command_line(monkeypatch):
  monkeypatch.chdir(cli.ROOT)
  # An option the config file never declared reaches the task, typed.
  c = _parse(CONFIG, "--config.task.options.split_seed=3", "--config.task.options.max_value=5")
  assert c.task.options.split_seed == 3 and c.task.options.max_value == 5
  assert config.validate(c).task.options["split_seed"] == 3
  c = _parse("--config=configs/paper.py:task=math", "--config.task.options.levels=1,2",
             "--config.task.options.path=7")
  assert c.task.options.levels == "1,2" and c.task.options.path == "7"   # declared strings
  # One the task does not know is refused by the task, which lists its options.
  c = _parse(CONFIG, "--config.task.options.colour=1")
  with pytest.raises(config.ConfigError, match="no option colour; its options: max_value, seed"):
    config.validate(c)
  # A bad override names that one flag, not the others.
  with pytest.raises(SystemExit, match=r"'roundz' in --config.debate.roundz=3;"):
    _parse(CONFIG, "--config.debate.rounds=2", "--config.debate.roundz=3")
  with pytest.raises(SystemExit, match="expected int"):
    _parse(CONFIG, "--config.task.options.max_value=five")




def test_dry_run_refuses_one_device_and_fits_a_64_chip_mesh(tmp_path):
  """A full-size paper config (Llama-3-8B, 3 generators + 3 critics), planned
  from its config.json alone: no weights exist, nothing is written."""
  model_dir = tmp_path / "llama3"
  model_dir.mkdir()
  (model_dir / "config.json").write_text(json.dumps(presets.hf_config("llama-3-8b")))
  args = ["--config=configs/paper.py:model=llama3,task=arithmetic",
          f"--config.model.path={model_dir}", f"--workdir={tmp_path / 'run'}", "--dry_run"]
  one = cli.run("train", *args, "--device_memory_gb=80", check=False)
  assert one.returncode == 1, one.stderr[-2000:]
  # 6 agents x 8.03B parameters x (4 bytes f32 + 8 bytes Adam) on one device.
  assert "parameters (f32 master)    192.73" in one.stdout
  assert "optimizer state            385.45" in one.stdout
  last = one.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the run needs 578.2 GB per device, more than the 80.0 GB")
  assert "config.mesh.fsdp" in last and "config.finetune.lora_rank" in last
  assert "temporaries          -" in one.stdout  # refused before compiling anything

  pod = cli.run("train", *args, "--device_memory_gb=95", "--config.mesh.agent=2",
                devices=64)
  assert "64 devices, mesh agent=2 x data=1 x fsdp=32 x tensor=1" in pod.stdout
  assert "parameters (f32 master)      3.01" in pod.stdout   # 192.73 / 64
  assert "-> fits" in pod.stdout and "temporaries          -" not in pod.stdout
  # Choices that fit but leave devices computing copies are named.
  assert "note: config.mesh.agent=2 does not divide agents.generators=3" in pod.stdout
  assert ("note: config.finetune.batch_size=4 is not a multiple of mesh.data x mesh.fsdp = 32"
          in pod.stdout)
  assert "note:" not in one.stdout
  assert not (tmp_path / "run").exists()

  # With LoRA the same 6 agents are one bf16 base and their adapters, and fit one card.
  (model_dir / "config.json").write_text(json.dumps(
      dict(presets.hf_config("llama-3-8b"), torch_dtype="bfloat16")))  # as published
  lora = cli.run("train", args[0] + ",lora=16", *args[1:], "--device_memory_gb=80")
  # 8.03B x 2 bytes, plus 6 x 42M adapter parameters x 4 bytes (Adam: x 2 more).
  assert "parameters (base+adapters)  17.07" in lora.stdout
  assert "optimizer state              2.01" in lora.stdout
  assert "-> fits" in lora.stdout


def _floats_close(a, b, path=""):
  """Equal JSON values, floats to 1e-5 relative (collectives may sum in another order)."""
  if isinstance(a, dict):
    assert a.keys() == b.keys(), path
    for k in a:
      _floats_close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), path
    for i, (x, y) in enumerate(zip(a, b)):
      _floats_close(x, y, f"{path}[{i}]")
  elif isinstance(a, float):
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (path, a, b)
  else:
    assert a == b, (path, a, b)


def test_two_processes_run_one_iteration_like_one_process(smoke_run, tmp_path):
  """Two real processes on localhost (2 fake CPU devices each, one global
  mesh of 4: split within and across processes) run one MAFT iteration of
  the smoke config; their records, transcripts and checkpoint equal those of
  the one-process, one-device smoke run's first iteration, and the
  checkpoint restores in this one process; launch.evaluate, on one device,
  reproduces the run's evaluation although the run's mesh (fsdp=4) does not
  fit there. (Two processes of 4 devices each cost twice the CPU and test
  nothing more: 8-device meshes are tested in-process.)"""
  args = [CONFIG, "--config.iterations=1", "--config.mesh.fsdp=4", "--noprogress", "--noreport"]
  one, two = pathlib.Path(smoke_run), tmp_path / "two"
  shutil.copytree(one / "demo_base", two / "demo_base")  # the same base, not rebuilt
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [cli.start("train", *args, f"--workdir={two}", f"--coordinator_address=localhost:{port}",
                     "--num_processes=2", f"--process_id={i}", devices=2,
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    errs = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  for i, err in enumerate(errs):  # each process built only its half of every batch (fsdp=4)
    assert f"process {i} builds rows [[[{4 * i}, {4 * i + 4}]], [[{4 * i}, {4 * i + 4}]]," in err

  got = cli.records(two, timing=False)
  _floats_close(got, cli.records(one, timing=False)[:len(got)])
  for name in ("debate", "eval"):
    a = json.loads((one / "iter_01" / name / "debate.json").read_text())
    b = json.loads((two / "iter_01" / name / "debate.json").read_text())
    assert a == b, name  # the same transcripts, token for token

  mesh = sharding.make_mesh((1, 1, 4, 1), jax.devices()[:4])
  pops = [checkpoint.load_population(str(w / "iter_01" / "finetune" / "population"),
                                     placement=sharding.Placement(mesh))[0]
          for w in (one, two)]
  lr = 3e-4  # configs/demo.py's finetune.learning_rate
  jax.tree.map(lambda x, y: same_update(np.asarray(x), np.asarray(y), "checkpoint", lr), *pops)

  out = tmp_path / "eval.json"
  proc = cli.run("evaluate", f"--workdir={two}", f"--output={out}", devices=1)
  assert "the run's mesh does not fit here" in proc.stderr
  evaluated, final_eval = json.loads(out.read_text()), cli.records(two)[-1]
  for key in ("round1_accuracy", "final_accuracy", "debate_accuracy", "consensus_rate"):
    assert evaluated[key] == final_eval[key], key
  np.testing.assert_allclose(evaluated["cross_nll"], final_eval["cross_nll"], rtol=1e-5)


@pytest.mark.parametrize("text", ["agent", "agent=--2", "agent=2,,fsdp=-1", "", "agent=2,agent=4",
                                  "pipeline=2"])
def test_evaluate_mesh_flag_errors_name_the_flag(text):
  with pytest.raises(config.ConfigError, match="--mesh=.*expected distinct axis=size"):
    common.mesh_for_here({}, text)


def test_evaluate_mesh_flag_overrides_the_default_mesh():
  config, note = common.mesh_for_here({"mesh": {"fsdp": 64}}, "agent=2, tensor=2")
  assert config["mesh"] == {"agent": 2, "data": 1, "fsdp": -1, "tensor": 2} and note is None
  config, note = common.mesh_for_here({"mesh": {"agent": 1, "fsdp": 64}}, None)
  assert config["mesh"]["fsdp"] == -1 and "the run's mesh does not fit here" in note
