"""The MAFT driver without a model: config validation, seeds, selection rows."""

import jax
import numpy as np
import pytest

from maft_jax import loop, scoring, tasks
from maft_jax.debate import Debate
from maft_jax.tasks import prompts


def _config(**groups):
  c = loop.default_config()
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
    (dict(agents=dict(generators=0)), "config.agents.generators=0: must be >= 1"),
    (dict(mesh=dict(agent=0)), "config.mesh.agent=0"),
    # The tests see one CPU device (or 8 fake ones): 3 never divides either.
    (dict(mesh=dict(agent=3, fsdp=-1)), "config.mesh={'agent': 3, 'data': 1, 'fsdp': -1, "
     "'tensor': 1}: mesh sizes"),
])
def test_validate_names_the_field(groups, field):
  with pytest.raises(loop.ConfigError, match=field.replace("(", r"\(").replace(".", r"\.")):
    loop.validate(_config(**groups))


def test_validate_unknown_field_and_defaults():
  with pytest.raises(loop.ConfigError, match=r"config\.debate\.roundz: unknown field"):
    loop.validate({"model": {"source": "demo"}, "debate": {"roundz": 2}})
  with pytest.raises(loop.ConfigError, match=r"config\.finetune\.epochs=1\.5: must be an integer"):
    loop.validate({"model": {"source": "demo"}, "finetune": {"epochs": 1.5}})
  plan = loop.validate({"model": {"source": "demo"}, "agents": {"generators": 5}})
  assert plan.num_agents == 10 and plan.rounds == 2 and plan.sft.hyper.learning_rate == 1e-5
  assert plan.config["debate"]["rounds"] == 2   # defaults are filled into the resolved config
  # LoRA is accepted when every iteration starts from the base.
  plan = loop.validate(_config(finetune=dict(lora_rank=4, init="base")))
  assert plan.sft.lora.rank == 4 and plan.sft.lora.alpha == 8.0


def test_stage_seeds_are_derived_and_distinct():
  seeds = {(k, s): loop.stage_seed(7, k, s) for k in range(4) for s in loop.STAGES}
  assert len(set(seeds.values())) == len(seeds)
  assert loop.stage_seed(7, 2, "eval") == seeds[(2, "eval")]  # a pure function
  assert loop.stage_seed(8, 2, "eval") != seeds[(2, "eval")]
  assert all(0 <= v < 2**20 for v in seeds.values())


def test_config_changes_allow_more_iterations_and_another_mesh_only():
  a = loop.validate(_config()).config
  b = loop.validate(_config(debate=dict(rounds=3))).config
  more = dict(a, iterations=a["iterations"] + 2)
  assert loop.config_changes(a, more) == []
  assert loop.config_changes(a, dict(a, mesh=dict(a["mesh"], agent=2, fsdp=4))) == []
  assert loop.config_changes(a, b) == ["debate.rounds was 2, now 3"]


class _Tok:
  chat_template = None


def _hand_debate(task, problems, round1_values, final_values):
  """Slot n answers problem b with \\boxed{value} (None: no answer)."""
  def texts(values):
    return [[f"so \\boxed{{{v}}}" if v is not None else "no idea" for v in slot]
            for slot in values]
  r1, r2 = texts(round1_values), texts(final_values)
  msgs1 = [[prompts.round1(p) for p in problems] for _ in r1]
  msgs2 = [[prompts.debate_round(p, own=r1[n][b], others=[r1[o][b] for o in range(len(r1))
                                                           if o != n])
            for b, p in enumerate(problems)] for n in range(len(r1))]
  keys = [[[task.extract_answer(t) for t in slot] for slot in r] for r in (r1, r2)]
  finishes = [[["stop"] * len(problems) for _ in r1] for _ in range(2)]
  return Debate(texts=[r1, r2], keys=keys, messages=[msgs1, msgs2], finishes=finishes)


@pytest.fixture
def hand_built():
  task = tasks.load("arithmetic", size=4, seed=0)
  problems = task.problems("all")[:4]
  ref = [int(p.reference) for p in problems]
  # 3 slots x 4 problems. Final round: problem 0 -> 2 of 3 say ref; problem 1 ->
  # all wrong (same wrong answer); problem 2 -> slot 2 alone is right, 0 and 1 agree on
  # a wrong answer; problem 3 -> everyone right.
  round1 = [[ref[0], ref[1] + 1, ref[2] + 1, ref[3]],
            [ref[0] + 1, ref[1] + 1, ref[2] + 1, ref[3]],
            [ref[0] + 2, None, ref[2], ref[3]]]
  final = [[ref[0], ref[1] + 1, ref[2] + 1, ref[3]],
           [ref[0], ref[1] + 1, ref[2] + 1, ref[3]],
           [ref[0] + 2, ref[1] + 1, ref[2], ref[3]]]
  return task, problems, _hand_debate(task, problems, round1, final)


def _plan(mode, **kw):
  return loop.validate(_config(selection=dict(mode=mode, **kw), agents=dict(generators=3)))


def _problems_of(rows, problems):
  return [[next(b for b, p in enumerate(problems) if p.question in r["prompt"]) for r in agent]
          for agent in rows]


def test_paper_selection_rows(hand_built):
  task, problems, d = hand_built
  rows, summary = loop.select(d, problems, task, plan=_plan("paper", critic_weight=0.5),
                              tokenizer=_Tok(), key=jax.random.key(0))
  # Consensus (final round): p0 ref, p1 ref+1 (wrong), p2 ref+1 (wrong), p3 ref.
  assert summary["consensus_accuracy"] == 0.5
  # Generators keep their own round-1 answers that agree with consensus.
  assert _problems_of(rows[:3], problems) == [[0, 1, 2, 3], [1, 2, 3], [3]]
  # Critic n: D^C- = round-1 slot n disagreed, final agrees; D^C+ kept by weight.
  # Critic 1 corrected p0, critic 2 p1 (no round-1 answer -> the consensus).
  assert summary["d_c_minus"] == [0, 1, 1] and summary["d_c_plus"] == [4, 3, 1]
  # With corrections, |D^C-|(1-w)/w = 1 D^C+ transcript joins; without, half of D^C+.
  assert summary["d_c_kept"] == [2, 1, 1] and summary["selected"] == [4, 3, 1, 2, 2, 2]
  # A critic's rows are its own final-round responses to its own transcript.
  for r in rows[3]:
    assert "These are the solutions" in r["prompt"] and r["completion"].startswith("so \\boxed")
    assert r["add_special_tokens"] and r["append_eos"]


def test_ground_truth_selection_rows(hand_built):
  task, problems, d = hand_built
  rows, summary = loop.select(d, problems, task, plan=_plan("ground_truth"), tokenizer=_Tok(),
                              key=jax.random.key(0))
  assert _problems_of(rows[:3], problems) == [[0, 3], [3], [2, 3]]
  assert summary["d_c_minus"] == [0, 1, 0] and summary["d_c_plus"] == [2, 1, 2]


def test_cross_agent_selection_copies_follow_the_weights(hand_built):
  task, problems, d = hand_built
  N, B = 3, len(problems)
  rng = np.random.default_rng(0)
  nll = rng.uniform(0.5, 3.0, size=(2 * N, N, B))  # [scorer, author, problem]

  def score(texts):
    assert len(texts) == N and len(texts[0]) == B
    return nll, np.ones_like(nll, dtype=np.int32)

  plan = _plan("cross_agent")
  rows, summary = loop.select(d, problems, task, plan=plan, tokenizer=_Tok(),
                              key=jax.random.key(3), score=score)
  correct = np.array([[task.is_correct(t, p) for t, p in zip(slot, problems)]
                      for slot in d.texts[0]])
  w = np.asarray(scoring.cross_agent_weights(correct, nll[:N]))
  for a in range(N):
    got = {}
    for r in rows[a]:
      got[(r["prompt"], r["completion"])] = got.get((r["prompt"], r["completion"]), 0) + 1
    # Every response an agent trains on is verified; copies are floor(w) or ceil(w).
    for src in range(N):
      for b in range(B):
        text = d.texts[0][src][b]
        n = sum(c for (p, t), c in got.items() if t == text and problems[b].question in p)
        same = [s for s in range(N) if d.texts[0][s][b] == text]
        lo = sum(int(np.floor(w[a, s, b])) for s in same)
        hi = sum(int(np.ceil(w[a, s, b])) for s in same)
        assert lo <= n <= hi, (a, src, b, n, lo, hi)
  # An agent's own verified responses are always kept.
  for a in range(N):
    for b in range(B):
      if correct[a, b]:
        assert any(r["completion"] == d.texts[0][a][b] for r in rows[a])
  assert summary["selected"][:N] == [len(r) for r in rows[:N]]


def test_scoring_rows_layout_and_row_nll_matches_cross_nll():
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
  matrix = scoring.cross_nll(pop, batch, cfg=cfg)
  np.testing.assert_allclose(np.asarray(sums).sum(-1) / np.asarray(counts).sum(-1), matrix,
                             rtol=1e-5)


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
        plan = loop.validate(c)
        assert plan.iterations == (0 if method == "base" else 5)
        assert (plan.generators, plan.rounds) == ((1, 1) if method == "single_agent" else
                                                 (5, 2) if method == "five_agents" else
                                                 (3, 1) if method == "majority_ft" else (3, 2))
  for variant in ("full", "smoke"):
    for method in methods.METHODS:
      loop.validate(demo.get_config(f"{variant},{method}"))
  with pytest.raises(loop.ConfigError, match=r"config\.task\.options\.path=None"):
    c = paper.get_config("model=phi3,task=gsm8k")
    c.model.path = str(model_dir)
    loop.validate(c)
