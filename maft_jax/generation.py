"""Host side of sampling: text in, completions out, for a whole population.

Tokenises prompts, sorts them by length and cuts them into fixed-shape
chunks (`batch_size` prompts, prompt length rounded up to a bucket), so the
number of compiled programs is bounded by the number of buckets; each new
shape is logged. Every prompt keeps its own RNG row id (its index in the
request), so results do not depend on batch size, sorting or chunking.
After decoding: detokenisation, host-side stop strings (including "stop after
the first complete \\boxed{...}"), and a progress line with tokens/s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import jax
import numpy as np

from maft_jax import checks, distributed, population, progress, sampling, sharding
from maft_jax.model import ModelConfig
from maft_jax.tasks import answers

FINISH_STOP, FINISH_STOP_STRING, FINISH_LENGTH = "stop", "stop_string", "length"


@dataclasses.dataclass(frozen=True)
class Completion:
  """After a host-side stop, `text` ends exactly at the stop and `token_ids`
  is the shortest token prefix whose text reaches it (its decoding may run a
  few characters past the stop when a token straddles it)."""
  text: str
  token_ids: tuple[int, ...]
  logprob: float   # sum of the model's log-probs over token_ids
  finish: str      # "stop" (EOS / stop id), "stop_string" or "length"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
  max_new_tokens: int
  method: object = sampling.Greedy()
  num_samples: int = 1
  batch_size: int = 32          # prompts per device call (rows = batch_size * num_samples)
  min_bucket: int = 16          # prompt lengths round up to min_bucket * {1, 1.5} * 2^k
  stop_strings: tuple[str, ...] = ()
  stop_after_boxed: bool = False
  extra_stop_ids: tuple[int, ...] = ()

  def __post_init__(self):
    checks.at_least(self, 1, "max_new_tokens", "num_samples", "batch_size", "min_bucket")


def bucket_length(n: int, min_bucket: int) -> int:
  """The smallest of min_bucket * {1, 1.5, 2, 3, 4, 6, ...} that holds n:
  at most a third of a row is padding, with two compiled shapes per octave."""
  b = min_bucket
  while b < n:
    if b > min_bucket and b * 3 // 2 >= n:  # b = min_bucket * 2^k, k >= 1: even
      return b * 3 // 2
    b *= 2
  return b


def first_boxed_end(text: str) -> int | None:
  """Index just past the closing brace of the first \\boxed{...}; None while
  that box is still open (or there is none)."""
  spans = answers.boxed_spans(text)
  return spans[0][1] if spans else None


def stop_cut(text: str, options: Options) -> int | None:
  """Where the text ends under the host-side stop rules (None: no stop)."""
  cuts = []
  for s in options.stop_strings:
    at = text.find(s)
    if at != -1:
      cuts.append(at + len(s))
  if options.stop_after_boxed:
    end = first_boxed_end(text)
    if end is not None:
      cuts.append(end)
  return min(cuts) if cuts else None


class Generator:
  """Generates for a population with one tokenizer; remembers compiled shapes."""

  def __init__(self, cfg: ModelConfig, tokenizer, *, pad_id: int | None = None,
               progress: bool = True, log: Callable[[str], None] = logging.info,
               placement: sharding.Placement = sharding.LOCAL):
    self.cfg, self.tok, self.placement = cfg, tokenizer, placement
    self.pad_id = pad_id if pad_id is not None else (
        tokenizer.pad_id if tokenizer.pad_id is not None else
        (tokenizer.eos_ids[0] if tokenizer.eos_ids else 0))
    self.progress, self.log = progress, log
    self.shapes: set[tuple] = set()

  def encode(self, prompts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    ids = self.tok.encode_batch(list(prompts), add_special_tokens=add_special_tokens)
    for i, row in enumerate(ids):
      if not row:
        raise ValueError(f"prompt {i} tokenises to zero tokens")
    return ids

  def generate(self, pop: population.Population, prompts, *, options: Options, key: jax.Array,
               add_special_tokens: bool = True) -> list[list[list[Completion]]]:
    """completions[agent][prompt][sample].

    `prompts`: P strings (or token-id lists) shared by every agent, or A lists
    of P each (agent a answers its own prompts, e.g. its debate transcript).
    """
    A = population.num_agents(pop)
    if len(prompts) == 0:
      return [[] for _ in range(A)]
    per_agent = isinstance(prompts[0], (list, tuple, np.ndarray)) and (
        len(prompts[0]) == 0 or not isinstance(prompts[0][0], (int, np.integer)))
    groups = list(prompts) if per_agent else [list(prompts)]
    if per_agent and len(groups) != A:
      raise ValueError(f"{len(groups)} prompt lists for a population of {A} agents")
    P = len(groups[0])
    if any(len(g) != P for g in groups):
      raise ValueError(f"per-agent prompt lists differ in length: {[len(g) for g in groups]}")
    ids = [[list(p) for p in g] if g and not isinstance(g[0], str)
           else self.encode(g, add_special_tokens=add_special_tokens) for g in groups]
    S, N = options.num_samples, options.max_new_tokens
    lengths = np.array([max(len(g[p]) for g in ids) for p in range(P)])
    order = np.argsort(-lengths, kind="stable")  # long prompts first: least padding
    stop_ids = tuple(sorted(set(self.tok.eos_ids) | set(options.extra_stop_ids)))
    out_tokens = np.zeros((A, P, S, N), np.int32)
    out_logprobs = np.zeros((A, P, S, N), np.float32)
    out_lengths = np.zeros((A, P, S), np.int32)
    B = min(options.batch_size, P)
    done_tokens = 0
    bar = progress.Line("sampling", total=P, unit="prompts", enabled=self.progress)
    for c in range(0, P, B):
      chunk = order[c:c + B]
      T = bucket_length(int(lengths[chunk].max()), options.min_bucket)
      rows = [[g[p] for p in chunk] + [[self.pad_id]] * (B - len(chunk)) for g in ids]
      padded = [sampling.left_pad(r, self.pad_id, T) for r in rows]
      tokens = np.stack([t for t, _ in padded]) if per_agent else padded[0][0]
      mask = np.stack([m for _, m in padded]) if per_agent else padded[0][1]
      prompt_ids = np.concatenate([chunk, np.full(B - len(chunk), P)])  # dummies: id P
      row_ids = (prompt_ids[:, None] * S + np.arange(S)).reshape(-1).astype(np.int32)
      shape = (A, B, T, S, N, per_agent, options.method, stop_ids)
      if shape not in self.shapes:
        self.shapes.add(shape)
        self.log(f"sampler: compiling for agents={A} batch={B} prompt_len={T} "
                 f"samples={S} new_tokens={N} ({len(self.shapes)} shape(s) so far)")
      axes = ("agent", "batch", "length") if per_agent else ("batch", "length")
      tokens, mask = (self.placement.put(x, axes) for x in (tokens, mask))
      res = sampling.sample(pop, tokens, mask, key, cfg=self.cfg, method=options.method,
                            max_new_tokens=N, stop_ids=stop_ids, pad_id=self.pad_id,
                            num_samples=S, row_ids=row_ids,
                            placement=self.placement)
      n = len(chunk)
      toks = distributed.to_host(res.tokens).reshape(A, B, S, N)[:, :n]
      out_tokens[:, chunk] = toks
      out_logprobs[:, chunk] = distributed.to_host(res.logprobs).reshape(A, B, S, N)[:, :n]
      out_lengths[:, chunk] = distributed.to_host(res.lengths).reshape(A, B, S)[:, :n]
      done_tokens += int(out_lengths[:, chunk].sum())
      bar.update(min(c + B, P), done_tokens, f"{done_tokens} tokens")
    bar.close()
    return [[[self._completion(out_tokens[a, p, s], out_logprobs[a, p, s],
                               int(out_lengths[a, p, s]), stop_ids, options)
              for s in range(S)] for p in range(P)] for a in range(A)]

  def _completion(self, tokens, logprobs, length, stop_ids, options: Options) -> Completion:
    ids = tokens[:length].tolist()
    finish = FINISH_STOP if ids and ids[-1] in stop_ids else FINISH_LENGTH
    text = self.tok.decode(ids)
    cut = stop_cut(text, options)
    if cut is not None:
      # The shortest token prefix whose text reaches the stop (decode is monotone
      # in the prefix for the tokenizers we support, so bisect).
      lo, hi = 1, len(ids)
      while lo < hi:
        mid = (lo + hi) // 2
        if stop_cut(self.tok.decode(ids[:mid]), options) is not None:
          hi = mid
        else:
          lo = mid + 1
      ids, text, finish = ids[:lo], text[:cut], FINISH_STOP_STRING
    return Completion(text=text, token_ids=tuple(ids), logprob=float(logprobs[:len(ids)].sum()),
                      finish=finish)
