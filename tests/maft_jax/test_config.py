"""maft_jax.config: the run config's schema and validation (one error naming the
field), the typed plan it builds, which config changes a resumed run accepts,
and every shipped config."""

import pytest

from maft_jax import config


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
    (dict(finetune=dict(lora_rank=-1)), "config.finetune.lora_rank=-1"),
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
  # LoRA from either start: the previous iteration's adapters, or the base's.
  for init in ("previous", "base"):
    plan = config.validate(_config(finetune=dict(lora_rank=4, init=init)))
    assert plan.finetune.sft.lora.rank == 4 and plan.finetune.sft.lora.alpha == 8.0


def test_config_changes_allow_more_iterations_and_another_mesh_only():
  a = config.validate(_config()).config
  b = config.validate(_config(debate=dict(rounds=3))).config
  more = dict(a, iterations=a["iterations"] + 2)
  assert config.config_changes(a, more) == []
  assert config.config_changes(a, dict(a, mesh=dict(a["mesh"], agent=2, fsdp=4))) == []
  assert config.config_changes(a, b) == ["debate.rounds was 2, now 3"]


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
