"""Scale-out on 8 fake CPU devices: a population sampling call and a train
step on meshes that split agents, data, FSDP and tensor dimensions give the
results of one device, and the rule table decides where every array lives;
the memory plan; several processes as one program."""

import json
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maft_jax import (checkpoint, config, data, distributed, finetune, hf, model, population,
                      presets, sampling, sft, sharding, source)
from maft_jax.sharding import PartitionSpec as P

from launch import common
from tests import cli

CFG = model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
H = finetune.Hyper(learning_rate=1e-3, warmup_frac=0.0, ce_chunk=5)
A = 8  # agents: every mesh's agent axis divides it
# (agent, data, fsdp, tensor)
# Two meshes split every axis (each mesh is a compile: 4 took 150 s of the suite).
MESHES = [(2, 2, 2, 1), (1, 1, 4, 2)]


def _follows_rules(tree, axes_tree, mesh):
  """Every leaf's sharding is the rule table's for its logical axes."""
  want = sharding.shardings(axes_tree, tree, mesh)
  got = jax.tree.map(lambda x: x.sharding.spec, tree)
  jax.tree.map(lambda g, w: _same_spec(g, w.spec), got, want,
               is_leaf=lambda x: isinstance(x, P))


def _same_spec(got, want):
  # Trailing unsplit dimensions may be left out of a spec: compare padded.
  n = max(len(got), len(want))
  pad = lambda s: tuple(s) + (None,) * (n - len(s))  # noqa: E731
  assert pad(got) == pad(want), (got, want)


def _prompts():
  rng = np.random.default_rng(0)
  rows = [rng.integers(4, CFG.vocab_size, n).tolist() for n in (3, 8, 5, 1)]
  return sampling.left_pad(rows, pad_id=0, length=8)


@pytest.fixture(scope="module")
def pop():
  assert jax.device_count() == 8
  return population.init(CFG, jax.random.key(3), A)


def test_sampling_on_meshes_matches_one_device(pop):
  tokens, mask = _prompts()
  method = sampling.from_flags(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
  kwargs = dict(cfg=CFG, method=method, max_new_tokens=6, stop_ids=(3,), pad_id=0)
  key = jax.random.key(11)
  expected = sampling.sample(pop, jnp.asarray(tokens), jnp.asarray(mask), key, **kwargs)
  for sizes in MESHES:
    mesh = sharding.make_mesh(sizes)
    placed = jax.device_put(pop, sharding.shardings(population.axes(CFG), pop, mesh))
    _follows_rules(placed, population.axes(CFG), mesh)
    rows = sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"),
                                                                 tokens.shape, mesh))
    t, m = jax.device_put(tokens, rows), jax.device_put(mask, rows)
    placement = sharding.Placement(mesh)
    with placement.context():
      state = sampling.prefill(placed, t, m, cfg=CFG, cache_len=14, placement=placement)
      # The KV cache is split over agents like the parameters are (its
      # agent axis is 1: the decode state is layer-major).
      assert state.k.sharding.spec[1] == ("agent" if sizes[0] > 1 else None)
      got = sampling.sample(placed, t, m, key, placement=placement, **kwargs)
    np.testing.assert_array_equal(got.tokens, expected.tokens, err_msg=str(sizes))
    np.testing.assert_array_equal(got.lengths, expected.lengths, err_msg=str(sizes))
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5, err_msg=str(sizes))


def test_activations_follow_the_rule_table(pop, monkeypatch):
  """Inside the compiled population forward, every activation the model pins
  (embeddings, q/k/v, attention output, residual stream, MLP hidden, logits)
  really is split as the rule table says for its logical axes, plus the agent
  axis that vmap's spmd_axis_name adds (dims the table leaves unsplit are the
  partitioner's choice)."""
  seen = []
  constrain = sharding.constrain

  def spy(x, axes, rules=None):
    y = constrain(x, axes, rules)
    mesh = jax.sharding.get_abstract_mesh()
    want = sharding.logical_to_spec(axes, x.shape, mesh,
                                    sharding._RULES.get() if rules is None else rules)
    jax.debug.inspect_array_sharding(
        y, callback=lambda s, a=tuple(axes), w=want, m=mesh: seen.append((a, w, s.spec, m)))
    return y
  monkeypatch.setattr(sharding, "constrain", spy)
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (A, 4, 8)), jnp.int32)
  for sizes in MESHES:
    mesh = sharding.make_mesh(sizes)
    placed = jax.device_put(pop, sharding.shardings(population.axes(CFG), pop, mesh))
    seen.clear()
    with sharding.use_mesh(mesh):
      jax.jit(jax.vmap(lambda p, t: model.forward(p, t, cfg=CFG)[0],
                       spmd_axis_name="agent"))(placed, tokens)
    kinds = {axes[2] for axes, *_ in seen}
    assert kinds == {"activation_embed", "heads", "kv_heads", "mlp", "vocab"}, kinds
    for axes, want, got, m in seen:
      got = _drop_unit_axes(got, m) + (None,) * (len(want) + 1)
      assert got[0] == ("agent" if m.shape["agent"] > 1 else None), (sizes, axes, got)
      for dim, split in enumerate(want):
        if split is not None:
          assert got[1 + dim] == split, (sizes, axes, want, got)
    if sizes == (1, 1, 4, 2):  # batch 4 on fsdp, heads / mlp / vocab on tensor
      by_axes = {axes: want for axes, want, *_ in seen}
      assert by_axes[("batch", "length", "mlp")] == P("fsdp", None, "tensor")
      assert by_axes[("batch", "length", "heads", "head_dim")] == P("fsdp", None, "tensor", None)


def test_a_placements_rules_govern_its_programs(pop, monkeypatch):
  """The rule table of a `Placement` is the one its programs pin activations
  with, and two placements on one mesh that differ only in rules compile two
  programs (the placement is part of the jit cache key)."""
  seen = []
  constrain = sharding.constrain

  def spy(x, axes, rules=None):
    if axes[2] == "mlp":
      seen.append(sharding.logical_to_spec(axes, x.shape, jax.sharding.get_abstract_mesh(),
                                           sharding._RULES.get() if rules is None else rules))
    return constrain(x, axes, rules)
  monkeypatch.setattr(sharding, "constrain", spy)
  mesh = sharding.make_mesh((1, 1, 4, 2))
  placed = jax.device_put(pop, sharding.shardings(population.axes(CFG), pop, mesh))
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (4, 8)), jnp.int32)
  no_tp_mlp = tuple((k, None if k == "mlp" else v) for k, v in sharding.DEFAULT_RULES)
  fwd = jax.jit(population.forward, static_argnames=("cfg", "placement"))
  outs = []
  for placement in (sharding.Placement(mesh), sharding.Placement(mesh, rules=no_tp_mlp)):
    seen.clear()
    with placement.context():
      outs.append(fwd(placed, tokens, cfg=CFG, placement=placement))
    assert seen and all(s == P("fsdp", None, "tensor" if placement.rules is sharding.DEFAULT_RULES
                               else None) for s in seen), seen
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def _drop_unit_axes(spec, mesh):
  """A spec without mesh axes of size 1 (which split nothing)."""
  out = []
  for entry in spec:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    names = tuple(n for n in names if mesh.shape[n] > 1)
    out.append(None if not names else names[0] if len(names) == 1 else names)
  return tuple(out)


def _batch():
  """[A, 1, b, T] batches: agent a trains on its own examples."""
  per_agent = []
  for a in range(A):
    rng = np.random.default_rng(a)
    examples = [{"prompt_ids": rng.integers(1, 64, rng.integers(2, 6)).tolist(),
                 "completion_ids": rng.integers(1, 64, rng.integers(2, 7)).tolist()}
                for _ in range(6)]
    per_agent.append(next(data.sft_batches(examples, batch_size=4, seq_len=16, seed=a,
                                           pad_id=0)))
  return {k: np.stack([b[k] for b in per_agent])[:, None] for k in per_agent[0]}


def test_rows_a_process_holds_on_an_interleaved_mesh():
  """Where the device order interleaves processes along the batch split, a
  process holds several intervals of rows: it builds those, not their span."""
  devs = jax.devices()
  grid = np.array(devs)[[0, 1, 4, 5, 2, 3, 6, 7]].reshape(1, 2, 4, 1)
  mesh = sharding.Mesh(grid, sharding.MESH_AXES)  # row r of 8 on the (data, fsdp) device r
  shape = (2, 1, 8, 16)
  assert sharding.addressable_rows(shape, sft.BATCH_AXES, mesh, per=0, along=2,
                                   devices=devs[:4]) == [[(0, 2), (4, 6)]] * 2
  assert sharding.addressable_rows(shape, sft.BATCH_AXES, mesh, per=0, along=2) == [[(0, 8)]] * 2
  agents = sharding.make_mesh((2, 1, 4, 1))  # agent 1 lives on devices 4-7
  assert sharding.addressable_rows(shape, sft.BATCH_AXES, agents, per=0, along=2,
                                   devices=devs[:4]) == [[(0, 8)], []]


def test_sft_run_building_rows_in_several_intervals_trains_the_same(pop, monkeypatch):
  """One pipeline per held interval of rows (an interleaved mesh's case) gives
  the batches, losses and weights of one pipeline over the whole batch."""
  mesh = sharding.make_mesh((2, 1, 4, 1))
  rng = np.random.default_rng(5)
  examples = [[{"prompt_ids": rng.integers(1, 64, rng.integers(2, 6)).tolist(),
                "completion_ids": rng.integers(1, 64, rng.integers(2, 7)).tolist()}
               for _ in range(9 + a)] for a in range(A)]
  examples[3] = []  # an agent without data
  settings = sft.Settings(hyper=H, epochs=2, batch_size=4, seq_len=16, grad_accum=2)

  def train():
    placed = jax.device_put(pop, sharding.shardings(population.axes(CFG), pop, mesh))
    placement = sharding.Placement(mesh)
    with placement.context():
      return sft.run(placed, examples, cfg=CFG, settings=settings, pad_id=0, progress=False,
                     placement=placement)
  whole = train()
  monkeypatch.setattr(sharding, "addressable_rows",
                      lambda shape, *a, **k: [[(0, 1), (1, 3), (3, 4)]] * shape[0])
  split = train()
  assert split.steps == whole.steps and split.tokens == whole.tokens
  assert split.final_loss == whole.final_loss
  jax.tree.map(np.testing.assert_array_equal, split.params, whole.params)


def test_base_copies_go_to_the_mesh_shard_by_shard(hf_models):
  """A copies of one HF base land on the mesh in the rule table's layout,
  equal to replicate() (each device is sent only its shard)."""
  src = source.describe("hf", hf_models("llama"), dtype="float32")
  mesh = sharding.make_mesh((2, 1, 4, 1))
  got = source.load(src, 4, sharding.Placement(mesh))
  _follows_rules(got, population.axes(src.cfg), mesh)
  assert got["layers"]["wq"].sharding.spec[0] == "agent"
  one = hf.load(hf_models("llama"), dtype="float32").params
  jax.tree.map(np.testing.assert_array_equal, got, population.replicate(one, 4))


def test_one_agent_checkpoint_base_is_copied_onto_the_mesh(hf_models, tmp_path):
  """A one-agent population checkpoint as the base (model.source=checkpoint):
  read onto a local device, copied onto an agent x fsdp mesh by the rule
  table; a checkpoint of several agents gives its first ones, or refuses more."""
  ckpt = str(tmp_path / "ckpt")
  cli.run("import_hf", f"--hf_dir={hf_models('llama')}", f"--out={ckpt}", "--agents=1")
  src = source.describe("checkpoint", ckpt, dtype="float32")
  mesh = sharding.make_mesh((2, 1, 4, 1))
  pop = source.load(src, 4, sharding.Placement(mesh))
  one, _ = checkpoint.load_population(ckpt, param_dtype="float32")
  _follows_rules(pop, population.axes(src.cfg), mesh)
  jax.tree.map(np.testing.assert_array_equal, pop, population.replicate(
      population.select(one, 0), 4))
  three = str(tmp_path / "three")
  checkpoint.save_population(three, population.init(src.cfg, jax.random.key(0), 3), cfg=src.cfg,
                             hf_config=src.hf_config, source_dtype="float32")
  src3 = source.describe("checkpoint", three, dtype="float32")
  first, _ = checkpoint.load_population(three)
  got = source.load(src3, 2)  # its first agents (launch.sample --agents)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[:2]), got, first)
  _follows_rules(source.load(src3, 3, sharding.Placement(mesh)), population.axes(src.cfg), mesh)
  with pytest.raises(source.SourceError, match="the checkpoint has 3 agents; 4 asked for"):
    source.load(src3, 4)
  with pytest.raises(source.SourceError, match="a mesh takes all of them"):
    source.load(src3, 2, sharding.Placement(mesh))


def test_train_step_on_meshes_matches_one_device(pop):
  batch = _batch()
  fresh = lambda: finetune.init_state(jax.tree.map(jnp.copy, pop), H, 10)  # noqa: E731
  expected, m_expected = finetune.train_step(fresh(), batch, cfg=CFG, h=H)
  abstract = jax.eval_shape(fresh)
  for sizes in MESHES:
    mesh = sharding.make_mesh(sizes)
    state = jax.device_put(fresh(), sharding.state_shardings(abstract, population.axes(CFG),
                                                             mesh))
    _follows_rules(state["params"], population.axes(CFG), mesh)
    spec = sharding.logical_to_spec(("agent", None, "batch", "length"),
                                    batch["tokens_BxT"].shape, mesh)
    placed = jax.device_put(batch, sharding.NamedSharding(mesh, spec))
    placement = sharding.Placement(mesh)
    with placement.context():
      got, m_got = finetune.train_step(state, placed, cfg=CFG, h=H, placement=placement)
    # The updated parameters stay where the rule table put them.
    _follows_rules(got["params"], population.axes(CFG), mesh)
    np.testing.assert_allclose(m_got["loss"], m_expected["loss"], rtol=1e-5, err_msg=str(sizes))
    jax.tree.map(lambda x, y: _same_update(np.asarray(x), np.asarray(y), str(sizes)),
                 got["params"], expected["params"])


def _same_update(x, y, where, lr=H.learning_rate):
  """Equal parameters after one Adam step, to fp32 reduction order. Adam's
  first step is ~lr * g / (|g| + eps): where a gradient is about eps, a
  last-bit difference in g moves the update by a visible fraction of lr, so
  a few such elements may differ by up to 5% of lr; the rest agree to 1e-6."""
  diff = np.abs(x - y)
  assert diff.max() <= 0.05 * lr, (where, diff.max())
  assert np.mean(diff > 1e-6) < 1e-3, (where, np.mean(diff > 1e-6))


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


def test_two_processes_run_one_iteration_like_one_process(tmp_path):
  """Two real processes on localhost (2 fake CPU devices each, one global
  mesh of 4: split within and across processes) run one MAFT iteration of
  the smoke config; their records equal a single-process 4-device run's, and
  the checkpoint they wrote restores in this one process; launch.evaluate, on
  one device, reproduces the run's evaluation although the run's mesh
  (fsdp=4) does not fit there. (Two processes of 4 devices each cost twice
  the CPU and test nothing more: 8-device meshes are tested in-process.)"""
  args = ["--config=configs/demo.py:smoke", "--config.iterations=1", "--config.mesh.fsdp=4",
          "--noprogress", "--noreport"]
  one, two = tmp_path / "one", tmp_path / "two"
  cli.run("train", *args, f"--workdir={one}", devices=4)
  shutil.copytree(one / "demo_base", two / "demo_base")  # the same base, not rebuilt
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = cli.env(devices=2)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "launch.train", *args, f"--workdir={two}",
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=cli.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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

  _floats_close(cli.records(two, timing=False), cli.records(one, timing=False))
  for name in ("debate", "eval"):
    a = json.loads((one / "iter_01" / name / "debate.json").read_text())
    b = json.loads((two / "iter_01" / name / "debate.json").read_text())
    assert a == b, name  # the same transcripts, token for token

  mesh = sharding.make_mesh((1, 1, 4, 1), jax.devices()[:4])
  pops = [checkpoint.load_population(str(w / "iter_01" / "finetune" / "population"),
                                     placement=sharding.Placement(mesh))[0]
          for w in (one, two)]
  lr = 3e-4  # configs/demo.py's finetune.learning_rate
  jax.tree.map(lambda x, y: _same_update(np.asarray(x), np.asarray(y), "checkpoint", lr), *pops)

  out = tmp_path / "eval.json"
  proc = cli.run("evaluate", f"--workdir={two}", f"--output={out}", devices=1)
  assert "the run's mesh does not fit here" in proc.stderr
  evaluated, final_eval = json.loads(out.read_text()), cli.records(two)[-1]
  for key in ("round1_accuracy", "final_accuracy", "debate_accuracy", "consensus_rate"):
    assert evaluated[key] == final_eval[key], key
  np.testing.assert_allclose(evaluated["cross_nll"], final_eval["cross_nll"], rtol=1e-5)


def test_distributed_flags_are_checked_before_joining():
  with pytest.raises(ValueError, match="give all of --coordinator_address"):
    distributed.initialize("localhost:1234", None, 0)
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, --num_processes=2\)"):
    distributed.initialize("localhost:1234", 2, 2)
  distributed.initialize("localhost:1234", 1, 0)  # one process: nothing to join
  assert jax.process_count() == 1 and distributed.is_primary()
  x = np.arange(4.0)
  np.testing.assert_array_equal(distributed.to_host(jnp.asarray(x)), x)


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
