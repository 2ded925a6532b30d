"""Scale-out on 8 fake CPU devices (maft_jax.sharding and what it places): a
population sampling call and a train step on meshes that split agents, data,
FSDP and tensor dimensions give the results of one device, the rule table
decides where every array and activation lives, bases are copied onto the mesh
shard by shard, and each process builds only its rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maft_jax import (checkpoint, data, finetune, hf, model, population, sampling, sft, sharding,
                      source)
from maft_jax.sharding import PartitionSpec as P

from tests.reference import same_update


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
  with (and the compiled program splits them so), and two placements on one
  mesh that differ only in rules compile two programs (the placement is part
  of the jit cache key). A placement with a mesh traced outside its context
  is refused instead of silently pinning nothing."""
  seen, rules_seen = [], []
  constrain = sharding.constrain

  def spy(x, axes, rules=None):
    y = constrain(x, axes, rules)
    if axes[2] == "mlp":
      rules_seen.append(sharding._RULES.get() if rules is None else rules)
      jax.debug.inspect_array_sharding(y, callback=lambda s: seen.append(s.spec))
    return y
  monkeypatch.setattr(sharding, "constrain", spy)
  mesh = sharding.make_mesh((1, 1, 4, 2))
  placed = jax.device_put(pop, sharding.shardings(population.axes(CFG), pop, mesh))
  tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, (4, 8)), jnp.int32)
  no_tp_mlp = {k: None if k == "mlp" else v for k, v in sharding.DEFAULT_RULES}
  fwd = jax.jit(population.forward, static_argnames=("cfg", "placement"))
  outs = []
  for placement in (sharding.Placement(mesh), sharding.Placement(mesh, rules=no_tp_mlp)):
    seen.clear()
    rules_seen.clear()
    with placement.context():
      outs.append(fwd(placed, tokens, cfg=CFG, placement=placement))
    assert rules_seen and all(r == placement.rules for r in rules_seen)  # traced again
    if placement.rules == sharding.DEFAULT_RULES:
      # [agent, batch, length, mlp]: batch on fsdp, mlp on tensor (agent is 1 here).
      assert seen and all((_drop_unit_axes(s, mesh) + (None,) * 4)[1:4] ==
                          ("fsdp", None, "tensor") for s in seen), seen
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  untraced = sharding.Placement(mesh, rules=dict(no_tp_mlp, vocab=None))
  with pytest.raises(sharding.MeshError, match="placement.context"):
    fwd(placed, tokens, cfg=CFG, placement=untraced)
  with pytest.raises(sharding.MeshError, match="no mesh"):
    sharding.LOCAL.shardings(population.axes(CFG), pop)


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
  checkpoint.import_hf(hf_models("llama"), ckpt, agents=1)
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
    jax.tree.map(lambda x, y: same_update(np.asarray(x), np.asarray(y), str(sizes), H.learning_rate),
                 got["params"], expected["params"])




def test_adapted_sampling_on_meshes_matches_one_device():
  """One base + adapters on a mesh: the base placed by the rule table
  without an agent axis (not split over agents), the adapters with it;
  sampling gives the one-device result."""
  from maft_jax import lora
  lcfg = lora.LoraConfig(rank=2, alpha=4.0)
  adapters = jax.tree.map(lambda x: x + 0.05, lora.init(CFG, lcfg, jax.random.key(4), A))
  adapted = population.Adapted(base=model.init_params(CFG, jax.random.key(5)),
                               adapters=adapters, scale=lcfg.scale)
  tokens, mask = _prompts()
  kwargs = dict(cfg=CFG, method=sampling.Temperature(1.0), max_new_tokens=6, stop_ids=(3,),
                pad_id=0)
  key = jax.random.key(12)
  expected = sampling.sample(adapted, jnp.asarray(tokens), jnp.asarray(mask), key, **kwargs)
  for sizes in MESHES:
    mesh = sharding.make_mesh(sizes)
    placed = jax.device_put(adapted, sharding.shardings(
        population.logical_axes(adapted, CFG), adapted, mesh))
    assert all("agent" not in str(x.sharding.spec) for x in jax.tree.leaves(placed.base))
    rows = sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"),
                                                                 tokens.shape, mesh))
    t, m = jax.device_put(tokens, rows), jax.device_put(mask, rows)
    placement = sharding.Placement(mesh)
    with placement.context():
      got = sampling.sample(placed, t, m, key, placement=placement, **kwargs)
    np.testing.assert_array_equal(got.tokens, expected.tokens, err_msg=str(sizes))
    np.testing.assert_allclose(got.logprobs, expected.logprobs, atol=1e-5, err_msg=str(sizes))
