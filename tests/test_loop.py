"""The run config and the driver without a model: validation, seeds, config changes."""

import jax
import numpy as np
import pytest

from maft_jax import config, scoring, stages


def _config(**groups):
  c = config.default_config()
  c.model.source = "demo"
  for group, values in groups.items():
    for k, v in values.items():
      c[group][k] = v
  return c


@pytest.mark.parametrize("groups,field", [
    (dict(debate=dict(rounds=0)), "config.debate.rounds=0"),
    (dict(selection=dict(mode="best")), "config.selection.mode='best'"),
    (dict(selection=dict(critic_weight=1.0)), "config.selection.critic_weight=1.0"),
    (dict(debate=dict(top_p=0.0)), "config.debate.top_p=0.0"),
    (dict(finetune=dict(lora_rank=4)), "config.finetune.lora_rank=4"),
    (dict(finetune=dict(seq_len=100, init="base"), debate=dict(max_new_tokens=512)),
     "config.finetune.seq_len=100"),
    (dict(agents=dict(shared=True)), "config.agents.shared=True"),
    (dict(task=dict(name="nope")), "config.task.name='nope'"),
    (dict(model=dict(source="hf")), "config.model.path=None"),
    (dict(model=dict(source="hf", path="/nonexistent")), "no config.json there"),
    (dict(eval=dict(temperature=-1.0)), "config.eval.temperature=-1.0"),
    # Greedy ignores the other sampling fields, but a bad one is still refused.
    (dict(eval=dict(temperature=0.0, top_p=0.0)), "config.eval.top_p=0.0"),
    (dict(agents=dict(generators=0)), "config.agents.generators=0: must be >= 1"),
    (dict(mesh=dict(agent=0)), "config.mesh.agent=0"),
    # The tests see one CPU device (or 8 fake ones): 3 never divides either.
    (dict(mesh=dict(agent=3, fsdp=-1)), "config.mesh={'agent': 3, 'data': 1, 'fsdp': -1, "
     "'tensor': 1}: mesh sizes"),
])
def test_validate_names_the_field(groups, field):
  with pytest.raises(config.ConfigError, match=field.replace("(", r"\(").replace(".", r"\.")):
    config.validate(_config(**groups))


def test_validate_unknown_field_and_defaults():
  with pytest.raises(config.ConfigError, match=r"config\.debate\.roundz: unknown field"):
    config.validate({"model": {"source": "demo"}, "debate": {"roundz": 2}})
  with pytest.raises(config.ConfigError,
                     match=r"config\.finetune\.epochs=1\.5: must be an integer"):
    config.validate({"model": {"source": "demo"}, "finetune": {"epochs": 1.5}})
  plan = config.validate({"model": {"source": "demo"}, "agents": {"generators": 5}})
  assert plan.num_agents == 10 and plan.debate.rounds == 2
  assert plan.finetune.sft.hyper.learning_rate == 1e-5
  assert plan.config["debate"]["rounds"] == 2   # defaults are filled into the resolved config
  # LoRA is accepted when every iteration starts from the base.
  plan = config.validate(_config(finetune=dict(lora_rank=4, init="base")))
  assert plan.finetune.sft.lora.rank == 4 and plan.finetune.sft.lora.alpha == 8.0


def test_stage_keys_are_derived_and_distinct():
  def data(key):
    return tuple(np.asarray(jax.random.key_data(key)).tolist())
  keys = {(k, s): data(stages.stage_key(7, k, s)) for k in range(4) for s in stages.NAMES}
  assert len(set(keys.values())) == len(keys)
  assert data(stages.stage_key(7, 2, "eval")) == keys[(2, "eval")]  # a pure function
  assert data(stages.stage_key(8, 2, "eval")) != keys[(2, "eval")]
  # fold_in along the path, never arithmetic on the seed
  want = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 2), stages.NAMES.index("eval"))
  assert data(want) == keys[(2, "eval")]


def test_config_changes_allow_more_iterations_and_another_mesh_only():
  a = config.validate(_config()).config
  b = config.validate(_config(debate=dict(rounds=3))).config
  more = dict(a, iterations=a["iterations"] + 2)
  assert config.config_changes(a, more) == []
  assert config.config_changes(a, dict(a, mesh=dict(a["mesh"], agent=2, fsdp=4))) == []
  assert config.config_changes(a, b) == ["debate.rounds was 2, now 3"]


def test_scoring_rows_layout_and_row_nll_is_every_agents_nll_of_every_row():
  from maft_jax import model, population
  r = scoring.scoring_rows([5, 6, 7, 8], [9, 10], seq_len=5, pad_id=0)
  assert r["tokens_BxT"].tolist() == [6, 7, 8, 9, 10]       # prompt cut from the left
  assert r["loss_mask_BxT"].tolist() == [0, 0, 0, 1, 1]
  r = scoring.scoring_rows([5], [], seq_len=4, pad_id=0)
  assert r["loss_mask_BxT"].sum() == 0 and r["segment_ids_BxT"].tolist() == [1, 0, 0, 0]
  cfg = model.ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, head_dim=8, dtype="float32")
  pop = population.init(cfg, jax.random.key(0), 2)
  rng = np.random.default_rng(0)
  rows = [[scoring.scoring_rows(rng.integers(1, 32, 3).tolist(), rng.integers(1, 32, 4).tolist(),
                                8, 0) for _ in range(3)] for _ in range(2)]
  batch = {k: np.stack([np.stack([x[k] for x in a]) for a in rows]) for k in rows[0][0]}
  sums, counts = scoring.row_nll(pop, batch, cfg=cfg)
  # Reference: each scorer's logits of each row alone, log-softmax by hand.
  for s in range(2):
    params = population.select(pop, s)
    for a in range(2):
      for b in range(3):
        r = rows[a][b]
        logits, _ = model.forward(params, r["tokens_BxT"][None], cfg=cfg)
        logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
        scored = np.flatnonzero(r["loss_mask_BxT"][1:])   # position t predicts token t+1
        nll = -sum(float(logp[t, r["tokens_BxT"][t + 1]]) for t in scored)
        assert int(counts[s, a, b]) == len(scored)
        np.testing.assert_allclose(float(sums[s, a, b]), nll, rtol=1e-4)


def _load_config_file(name):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_shipped_config_validates(tmp_path, monkeypatch):
  from configs import methods
  from tests import cli
  monkeypatch.chdir(cli.ROOT)
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  (model_dir / "config.json").write_text("{}")
  data = tmp_path / "train.jsonl"
  data.write_text("")
  paper, demo = _load_config_file("paper"), _load_config_file("demo")
  for model in paper.MODELS:
    for task in paper.TASKS:
      for method in methods.METHODS:
        c = paper.get_config(f"model={model},task={task},method={method}")
        c.model.path = str(model_dir)
        if "path" in c.task.options:
          c.task.options.path = str(data)
        plan = config.validate(c)
        assert plan.iterations == (0 if method == "base" else 5)
        assert (plan.finetune.init == "base") == (method == "star")
        assert (plan.agents.generators, plan.debate.rounds) == (
            (1, 1) if method in ("single_agent", "star") else (5, 2) if method == "five_agents"
            else (3, 1) if method == "majority_ft" else (3, 2))
  for variant in ("full", "smoke"):
    for method in methods.METHODS:
      config.validate(demo.get_config(f"{variant},{method}"))
  smollm2 = _load_config_file("smollm2")
  for variant in smollm2.VARIANTS:
    for method in methods.METHODS:
      c = smollm2.get_config(f"{variant},{method}")
      c.model.path = str(model_dir)
      plan = config.validate(c)
      assert (plan.finetune.sft.lora is not None) == (variant != "gpu"), (variant, method)
  with pytest.raises(config.ConfigError, match=r"config\.task\.options\.path=None"):
    c = paper.get_config("model=phi3,task=gsm8k")
    c.model.path = str(model_dir)
    config.validate(c)


def test_stage_records_round_trip_and_damaged_or_foreign_ones_are_named(tmp_path):
  """A committed stage reads back as the record it wrote; a summary.json of
  another record version, cut short, or missing a field is an error naming
  the file (never silently read as a different record)."""
  import json
  import os

  from maft_jax import loop, records
  data = records.Finetune(examples=[3, 0], steps=[2, 0], final_loss=[0.5, None], tokens=40)
  stage = loop.Stage(str(tmp_path), 1, "finetune")
  stage.begin()
  # Checked as it will be read, before anything is committed.
  with pytest.raises(records.RecordError, match="'final_loss' must be"):
    stage.commit(1, "finetune", records.Finetune(examples=[1], steps=[1],
                                                 final_loss=[float("nan")], tokens=4), 1.0)
  with pytest.raises(records.RecordError, match="the finetune stage returned a Debate"):
    stage.commit(1, "finetune", records.Debate(problems=1, responses=2), 1.0)
  assert not stage.done
  stage.commit(1, "finetune", data, seconds=2.5)
  got = stage.record(1, "finetune")
  assert got == records.Record(1, "finetune", 2.5, data)
  assert records.parse(records.to_line(got), "x") == got
  path = os.path.join(stage.dir, "summary.json")
  raw = json.loads(open(path).read())
  for damaged, message in [(dict(raw, version=0), "record format version 0"),
                           ({k: v for k, v in raw.items() if k != "steps"}, "has no 'steps'"),
                           (dict(raw, tokens=1.5), "'tokens' must be int")]:
    with open(path, "w") as f:
      json.dump(damaged, f)
    with pytest.raises(config.ConfigError, match=f"{path}: .*{message}"):
      stage.record(1, "finetune")
  with open(path, "w") as f:
    f.write(json.dumps(raw)[:20])
  with pytest.raises(config.ConfigError, match=f"{path}: not valid JSON"):
    stage.record(1, "finetune")
  # A rerun refuses such a workdir before any stage runs.
  plan = config.validate({"model": {"source": "demo"}, "iterations": 1})
  run = loop.Run(plan, str(tmp_path))
  with open(os.path.join(str(tmp_path), "config.json"), "w") as f:
    json.dump(plan.config, f)
  with pytest.raises(config.ConfigError, match=f"{path}: not valid JSON"):
    run.check_workdir()
  assert run._env is None  # nothing built, nothing loaded
