"""Methods and baselines as config edits, shared by every config file.

    maft          N generators + N critics, M-round debate, paper selection (default)
    no_critic     the paper's ablation: generators only, trained on D^G
    five_agents   N = 5
    summarize     critics read a summary of the other answers, written by themselves
    ground_truth  MAFT with agreement replaced by verification against references
    cross_agent   verified responses from any agent, weighted toward an agent's
                  failures and the responses it finds unlikely (see selection.select)
    star          STaR (Zelikman et al. 2022): one agent, one round;
                  every iteration restarts from the base and trains on the union so
                  far of its verified rationales and of its verified
                  rationalisations of failures (asked with the answer as a hint,
                  trained without it)
    single_agent  rejection-sampling finetuning (RFT): one agent, one round,
                  trained on its own verified answers, continuing from the
                  previous iteration
    majority_ft   one model (N slots share it) trained on its samples that agree
                  with the majority vote
    base          no finetuning (iterations = 0): the evaluation of the base gives
                  the base model, majority vote, debate and best-of-N baselines
"""

METHODS = ("maft", "no_critic", "five_agents", "summarize", "ground_truth", "cross_agent",
           "star", "single_agent", "majority_ft", "base")


def apply(c, method: str):
  """Edit config `c` in place for `method`; returns it."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
  if method == "no_critic":
    c.agents.critics = False
  elif method == "five_agents":
    c.agents.generators = 5
  elif method == "summarize":
    c.debate.summarize = True
  elif method in ("ground_truth", "cross_agent"):
    c.selection.mode = method
  elif method == "star":
    c.agents.generators, c.agents.critics = 1, False
    c.debate.rounds = c.eval.rounds = 1
    c.selection.mode, c.finetune.init = "star", "base"
  elif method == "single_agent":
    c.agents.generators, c.agents.critics = 1, False
    c.debate.rounds = c.eval.rounds = 1
    c.selection.mode = "ground_truth"
  elif method == "majority_ft":
    c.agents.shared, c.agents.critics = True, False
    c.debate.rounds = c.eval.rounds = 1
  elif method == "base":
    c.iterations = 0
  c.name = f"{c.name}-{method}" if method != "maft" else c.name
  return c


def parse(arg: str | None, **defaults) -> dict:
  """'key=value,key=value' (or a bare method name) -> dict over `defaults`."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep:
      key, value = ("method", key) if key in METHODS else ("variant", key)
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; arguments: {', '.join(sorted(out))}")
    out[key] = value
  return out
