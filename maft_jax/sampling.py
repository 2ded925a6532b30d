"""Population sampling: one jitted prefill + decode loop for every agent.

Rows are left-padded, so every row's last prompt token sits in the same cache
slot and each decode step writes one shared slot; positions come from the
padding mask (HF generate's convention), so padding never changes results.

Sampling methods are small frozen dataclasses that turn logits into a
sampling distribution; `Chain` composes them in HF's order (temperature,
top-k, top-p, min-p). Agent i draws from `fold_in(key, i)` and row r of it
from `fold_in(that, r)`, so its samples do not depend on which other agents
or rows run beside it.

Two jitted programs: `prefill` reads the prompts into a KV cache (once per
prompt, shared by its num_samples rows), `decode` runs one `lax.while_loop`
that exits as soon as every row of every agent has stopped, with the prefill
state donated so the cache buffers are reused in place.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import numpy as np

from maft_jax import checks, lora, model, population, sharding
from maft_jax.model import ModelConfig
from maft_jax.population import Population
from maft_jax.sharding import LOCAL, Placement

_NEG = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Greedy:
  """Argmax (temperature 0)."""

  def process(self, logits_BxV):
    return logits_BxV


@dataclasses.dataclass(frozen=True)
class Temperature:
  temperature: float

  def __post_init__(self):
    checks.check(self.temperature > 0, "temperature", self.temperature,
                 "must be > 0 (0 in a flag: greedy)")

  def process(self, logits_BxV):
    return logits_BxV / self.temperature


@dataclasses.dataclass(frozen=True)
class TopK:
  k: int

  def __post_init__(self):
    checks.check(self.k >= 1, "top_k", self.k, "must be >= 1 (0 in a flag: off)")

  def process(self, logits_BxV):
    k = min(self.k, logits_BxV.shape[-1])
    kth = jax.lax.top_k(logits_BxV, k)[0][:, -1:]
    return jnp.where(logits_BxV < kth, _NEG, logits_BxV)


@dataclasses.dataclass(frozen=True)
class TopP:
  """Nucleus: the smallest set of top tokens whose probability reaches p;
  a token is kept when the mass of the tokens strictly above it is < p (the
  top one always; tokens tied with the last one kept are all kept).

  `process` finds the nucleus with a sort. Drawing from it needs no sort,
  which matters: sorting [rows, 152k] logits every decode step costs more
  than the model's forward. A draw is the Gumbel-max over the nucleus (argmax
  of logits + noise over the kept tokens), and `draw_rows` finds it by
  rounds: take the argmax above a floor; if the mass strictly above that
  token is < p, it is in the nucleus and, being the largest above the floor,
  it is the answer; otherwise neither it nor any token below it is in the
  nucleus, so the floor rises to it. One noise draw serves every round, so
  the token is the one the sorted nucleus gives with the same noise (up to
  float rounding of the masses at the nucleus's edge). Each round is two
  passes over the vocabulary; a handful suffice even for 256 rows.
  """
  p: float

  def __post_init__(self):
    checks.check(0 < self.p <= 1, "top_p", self.p, "must be in (0, 1]")

  def process(self, logits_BxV):
    sorted_logits = -jnp.sort(-logits_BxV, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The last kept token's logit; every token at least as large is kept.
    kept = jnp.sum(mass_before < self.p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, jnp.maximum(kept, 1) - 1, axis=-1)
    return jnp.where(logits_BxV >= threshold, logits_BxV, _NEG)

  def draw_rows(self, logits_RxV, proposal_RxV, keys_R):
    """One token per row from the nucleus of softmax(logits_RxV), weighted by
    softmax(proposal_RxV) (the steps after this one in a chain; they keep the
    top token); row r's noise is gumbel(keys_R[r])."""
    R, V = logits_RxV.shape
    # Probabilities are recomputed inside each round's sum rather than kept:
    # one pass over the logits per round instead of writing and reading [R, V].
    lse_Rx1 = jax.nn.logsumexp(logits_RxV, axis=-1, keepdims=True)
    perturbed_RxV = proposal_RxV + _gumbel_rows(keys_R, V)

    def body(carry):
      n, done_R, tok_R, floor_R = carry
      above_floor = logits_RxV > floor_R[:, None]
      cand_R = jnp.argmax(jnp.where(above_floor, perturbed_RxV, _NEG), axis=-1).astype(jnp.int32)
      cand_logit_Rx1 = jnp.take_along_axis(logits_RxV, cand_R[:, None], axis=-1)
      above_RxV = logits_RxV > cand_logit_Rx1
      mass_above_R = jnp.sum(jnp.where(above_RxV, jnp.exp(logits_RxV - lse_Rx1), 0.0), axis=-1)
      # Written so that NaN logits (a diverged model) accept and end the loop.
      accept_R = ~done_R & ~(mass_above_R >= self.p)
      tok_R = jnp.where(accept_R, cand_R, tok_R)
      floor_R = jnp.where(done_R | accept_R, floor_R, cand_logit_Rx1[:, 0])
      return n + 1, done_R | accept_R, tok_R, floor_R

    carry = (jnp.zeros((), jnp.int32), jnp.zeros((R,), jnp.bool_), jnp.zeros((R,), jnp.int32),
             jnp.full((R,), _NEG, logits_RxV.dtype))
    # Each rejection drops at least one token, so V rounds always suffice.
    return jax.lax.while_loop(lambda c: (c[0] < V) & ~jnp.all(c[1]), body, carry)[2]


@dataclasses.dataclass(frozen=True)
class MinP:
  """Drop tokens whose probability is below p times the top probability."""
  p: float

  def __post_init__(self):
    checks.check(0 <= self.p <= 1, "min_p", self.p, "must be in [0, 1] (0: off)")

  def process(self, logits_BxV):
    # probs < p * max(probs), written without the normalisation so that it
    # gives the same set before or after another step masks the tail.
    if self.p == 0:
      return logits_BxV
    top = jnp.max(logits_BxV, axis=-1, keepdims=True)
    return jnp.where(logits_BxV - top < np.log(self.p), _NEG, logits_BxV)


@dataclasses.dataclass(frozen=True)
class Chain:
  steps: tuple

  def process(self, logits_BxV):
    for step in self.steps:
      logits_BxV = step.process(logits_BxV)
    return logits_BxV


def from_flags(*, temperature: float, top_k: int = 0, top_p: float = 1.0,
               min_p: float = 0.0):
  """The method a command line asks for; temperature 0 is greedy, and top_k
  0, top_p 1 and min_p 0 are off. Any other value makes its step, which
  checks it (one rule per setting)."""
  steps = [Temperature(temperature)] if temperature != 0 else []
  if top_k != 0:
    steps.append(TopK(top_k))
  if top_p != 1.0:
    steps.append(TopP(top_p))
  if min_p != 0.0:
    steps.append(MinP(min_p))
  if temperature == 0:  # the other steps were built to check them: greedy ignores them
    return Greedy()
  return steps[0] if len(steps) == 1 else Chain(tuple(steps))


def _gumbel_rows(keys_R, V: int):
  """Row r's Gumbel noise, gumbel(keys_R[r], (V,)): argmax(logits + noise) is
  then exactly jax.random.categorical(keys_R[r], logits)."""
  return jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys_R)


def draw_rows(method, logits_RxV, keys_R):
  """One token per row, the Gumbel-max of the method's distribution with row
  r's noise from keys_R[r] alone.

  A chain's last TopP finds its nucleus's draw without a sort (see TopP); the
  steps after it (temperature, top-k, min-p) are applied to the logits before
  the nucleus instead of after it, which gives the same draw: each keeps the
  top token and keeps exactly the nucleus tokens it would keep after it
  (min-p compares logits with the top one, so masking does not move it)."""
  if isinstance(method, Greedy):
    return jnp.argmax(logits_RxV, axis=-1).astype(jnp.int32)
  logits_RxV = logits_RxV.astype(jnp.float32)
  steps = method.steps if isinstance(method, Chain) else (method,)
  nuclei = [i for i, step in enumerate(steps) if isinstance(step, TopP)]
  if not nuclei:
    noise_RxV = _gumbel_rows(keys_R, logits_RxV.shape[-1])
    return jnp.argmax(Chain(steps).process(logits_RxV) + noise_RxV, axis=-1).astype(jnp.int32)
  last = nuclei[-1]
  before = Chain(steps[:last]).process(logits_RxV)
  return steps[last].draw_rows(before, Chain(steps[last + 1:]).process(before), keys_R)


@dataclasses.dataclass(frozen=True)
class Samples:
  """tokens i32[A, R, N] (pad after the stop), logprobs f32[A, R, N] (the
  model's log-softmax at each drawn token), lengths i32[A, R] (stop
  included), steps i32[A] (decode-loop iterations run: the same for every
  agent, the loop runs until all rows stop). R = B * num_samples,
  prompt-major: row b * num_samples + s is sample s of prompt b."""
  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  steps: jax.Array


jax.tree_util.register_dataclass(Samples, data_fields=["tokens", "logprobs", "lengths", "steps"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True, eq=False)  # leaves are arrays: no field-wise ==
class DecodeState:
  """Every agent's decode state: what `prefill` leaves and `decode` goes on
  from (a pytree; R = B * num_samples rows, S cache slots).

    k, v:     [L, A, R, K, S, Dh]  the KV cache, layer-major (below)
    mask:     bool[A, R, S]        slots holding a token of the row
    pos:      i32[A, R, S]         those tokens' positions
    index:    i32[]                the next cache slot: one for every agent
                                   and row (prompts are left-padded to one
                                   length and every row steps in lockstep)
    logits:   f32[A, R, V]         the next token's logits
    next_pos: i32[A, R]            the next token's position

  Layer-major: the decode loop reads the cache's k/v as [L, A, ...] and
  `decode_weights` holds the layer weights [L, A, ...]. The layer scan of an
  agent-vmapped step then takes them as they lie (a vmapped scan wants its
  inputs' agent axis at 1), and each layer's slice for every agent is one
  contiguous block. With [A, L, ...] every step transposed all weights and
  the cache, and a strided slice is copied before a matmul reads it (XLA's
  dynamic-slice fusion, which lets a matmul read a slice in place, takes
  contiguous slices only)."""
  k: jax.Array
  v: jax.Array
  mask: jax.Array
  pos: jax.Array
  index: jax.Array
  logits: jax.Array
  next_pos: jax.Array

  def cache(self) -> dict:
    """The model's cache dict (`model.extend_hidden`), agent axis as above."""
    return {"k": self.k, "v": self.v, "mask": self.mask, "pos": self.pos, "index": self.index}


_STATE_FIELDS = [f.name for f in dataclasses.fields(DecodeState)]
jax.tree_util.register_dataclass(DecodeState, data_fields=_STATE_FIELDS, meta_fields=[])
# Where each leaf's agent axis is (vmap in/out axes); `index` has none.
_KV_AXES = {"k": 1, "v": 1, "mask": 0, "pos": 0}
STATE_AXES = DecodeState(**_KV_AXES, index=None, logits=0, next_pos=0)


def decode_weights(pop: Population, cfg: ModelConfig) -> Population:
  """What the decode loop reads, made once per decode call (a copy, also of
  weights already in the compute dtype): `model.for_compute`'s cast (f32
  masters would be read at twice the bytes on every step), the layer stack
  layer-major ([A, L, ...] -> [L, A, ...]) and pinned to the rule table's
  layout with its first two axes swapped. Of an Adapted population, the
  base keeps its layout (it has no agent axis: every agent's step reads the
  same copy) and the adapters go layer-major."""
  if isinstance(pop, population.Adapted):
    adapters = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), model.for_compute(pop.adapters, cfg))
    agent_second = {k: (a[0], "agent") + a[1:] for k, a in lora.ADAPTER_AXES.items()}
    axes = {t: agent_second for t in adapters}
    return population.Adapted(base=model.for_compute(pop.base, cfg),
                              adapters=sharding.constrain_state(adapters, axes), scale=pop.scale)
  cast = model.for_compute(pop, cfg)
  layers = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), cast["layers"])
  axes = jax.tree.map(lambda a: (a[0], "agent") + a[1:], model.param_axes(cfg)["layers"],
                      is_leaf=lambda x: isinstance(x, tuple))
  return {**cast, "layers": sharding.constrain_state(layers, axes)}


def _weight_axes(weights: Population):
  """vmap axes of `decode_weights`: the agent axis is 1 in the layer stack
  (of an Adapted population: in the adapters; its base is not mapped)."""
  if isinstance(weights, population.Adapted):
    return population.vmap_axes(weights, axis=1)
  return {k: jax.tree.map(lambda _: 1 if k == "layers" else 0, v) for k, v in weights.items()}


def _prefill_one(agent: Population, prompt_BxT, mask_BxT, *, cfg: ModelConfig, cache_len: int,
                 num_samples: int):
  """Prefill B prompts once, then give each of its num_samples rows a copy."""
  params, lora, scale = population.parts(agent)
  positions = model.positions_from_mask(mask_BxT)
  hidden, cache = model.prefill(params, prompt_BxT, cfg=cfg, positions_BxT=positions,
                                segment_ids_BxT=mask_BxT.astype(jnp.int32), cache_len=cache_len,
                                lora=lora, lora_scale=scale)
  logits = model.logits_from_hidden(params, hidden[:, -1:], cfg)[:, 0]
  rows = lambda x, axis: jnp.repeat(x, num_samples, axis=axis)  # noqa: E731
  return DecodeState(k=rows(cache["k"], 1), v=rows(cache["v"], 1), mask=rows(cache["mask"], 0),
                     pos=rows(cache["pos"], 0), index=cache["index"], logits=rows(logits, 0),
                     next_pos=rows(positions[:, -1] + 1, 0))


def _start_one(logits, next_pos, key, row_ids, *, max_new_tokens: int, pad_id: int):
  """One agent's loop state before the first step, and its rows' keys."""
  R, N = row_ids.shape[0], max_new_tokens
  row_keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(row_ids)
  return (jnp.full((R, N), pad_id, jnp.int32), jnp.zeros((R, N), jnp.float32),
          jnp.zeros((R,), jnp.bool_), logits, next_pos), row_keys


def _step_one(agent: Population, carry, cache, row_keys, step, *, cfg: ModelConfig, method,
              stops, pad_id: int):
  """One decode step of one agent: draw a token for every row and run it
  through the model. Returns the new carry and the token's cache entries,
  which `decode` writes outside the agent vmap: a write inside it would be
  a batched update, which JAX turns into a transposed copy of the cache.
  Rows that have stopped emit padding and their outputs are discarded."""
  params, lora, scale = population.parts(agent)
  tokens, logprobs, done, logits, pos = carry
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
  tok = draw_rows(method, logits, step_keys)
  # log_softmax at the drawn token, without an [R, V] log_softmax array.
  lp = (jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0]
        - jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1))
  tok = jnp.where(done, pad_id, tok)
  lp = jnp.where(done, 0.0, lp)
  tokens = jax.lax.dynamic_update_slice_in_dim(tokens, tok[:, None], step, axis=1)
  logprobs = jax.lax.dynamic_update_slice_in_dim(logprobs, lp[:, None], step, axis=1)
  done = done | jnp.isin(tok, stops)
  hidden, entries = model.extend_hidden(params, tok[:, None], cfg=cfg,
                                        positions_BxT=pos[:, None], cache=cache, lora=lora,
                                        lora_scale=scale)
  logits = model.logits_from_hidden(params, hidden, cfg)[:, 0]
  return (tokens, logprobs, done, logits, pos + 1), entries


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "num_samples", "placement"))
def prefill(pop: Population, prompts, prompt_mask, *, cfg: ModelConfig, cache_len: int,
            num_samples: int = 1, placement: Placement = LOCAL):
  """The `DecodeState` of every agent after reading the prompts (see `sample`)."""
  in_axis = 0 if prompts.ndim == 3 else None
  fn = functools.partial(_prefill_one, cfg=cfg, cache_len=cache_len, num_samples=num_samples)
  with placement.tracing():
    return jax.vmap(fn, in_axes=(population.vmap_axes(pop), in_axis, in_axis),
                    out_axes=STATE_AXES,
                    spmd_axis_name=placement.spmd_axis_name)(pop, prompts, prompt_mask)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new_tokens", "stop_ids",
                                             "pad_id", "placement"),
                   donate_argnames=("state",))
def decode(pop: Population, state, key, row_ids=None, *, cfg: ModelConfig, method,
           max_new_tokens: int, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
           placement: Placement = LOCAL) -> tuple[Samples, DecodeState]:
  """Decode every agent from `prefill`'s state. The state is donated and the
  final state returned, so the loop updates the cache in the donated buffers
  instead of copying them first.

  One `while_loop` runs the agent-vmapped step until every row of every agent
  has stopped. (A vmapped per-agent loop would run just as many steps, since
  the agents run in lockstep, and would also select between the old and new
  cache of every agent on every step, reading and writing the whole cache.)
  In the final `DecodeState`, agents that stopped early hold padding in the
  slots after their stop; `index`, `next_pos` and `logits` are after the
  last step."""
  with placement.tracing():
    return _decode(pop, state, key, row_ids, cfg, method, max_new_tokens, stop_ids, pad_id,
                   placement.spmd_axis_name)


def _decode(pop, state: DecodeState, key, row_ids, cfg, method, max_new_tokens, stop_ids, pad_id,
            spmd_axis_name):
  A = population.num_agents(pop)
  N = max_new_tokens
  if row_ids is None:
    row_ids = jnp.arange(state.logits.shape[1])
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(A))
  stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
  start = functools.partial(_start_one, max_new_tokens=N, pad_id=pad_id)
  carry, row_keys = jax.vmap(start, in_axes=(0, 0, 0, None), spmd_axis_name=spmd_axis_name)(
      state.logits, state.next_pos, keys, row_ids)
  weights = decode_weights(pop, cfg)
  step_all = jax.vmap(functools.partial(_step_one, cfg=cfg, method=method, stops=stops,
                                        pad_id=pad_id),
                      in_axes=(_weight_axes(weights), 0, STATE_AXES.cache(), 0, None),
                      out_axes=(0, _KV_AXES), spmd_axis_name=spmd_axis_name)
  cache = state.cache()

  def cond(c):
    step, (_, _, done, *_), _ = c
    return (step < N) & ~jnp.all(done)

  def body(c):
    step, carry, cache = c
    carry, entries = step_all(weights, carry, cache, row_keys, step)
    return step + 1, carry, model.write_cache(cache, entries)

  steps, (tokens, logprobs, _, logits, pos), cache = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), carry, cache))
  is_stop = jnp.isin(tokens, stops)
  lengths = jnp.where(jnp.any(is_stop, axis=-1), jnp.argmax(is_stop, axis=-1) + 1, N)
  samples = Samples(tokens, logprobs, lengths.astype(jnp.int32), jnp.full((A,), steps))
  return samples, DecodeState(**cache, logits=logits, next_pos=pos)


def sample(pop: Population, prompts, prompt_mask, key, *, cfg: ModelConfig, method,
           max_new_tokens: int, stop_ids: tuple[int, ...] = (), pad_id: int = 0,
           num_samples: int = 1, row_ids=None, placement: Placement = LOCAL) -> Samples:
  """Sample every agent: one jitted prefill, then one jitted decode loop.

  prompts / prompt_mask: left-padded [B, T] shared by all agents, or [A, B, T]
  per agent. Each prompt is prefilled once and decoded num_samples times.
  Randomness: agent a, row r, step t draws with fold_in(fold_in(fold_in(key,
  a), row_ids[r]), t), so a row's samples depend only on the key, its agent
  slot and its row id (default: its index), never on the other agents or rows.

  placement: the mesh, rules and agent axis (`sharding.Placement`; run under
  its `context()`); the default splits nothing and leaves placement to the
  inputs' shardings.
  """
  T = prompts.shape[-1]
  state = prefill(pop, prompts, prompt_mask, cfg=cfg, cache_len=T + max_new_tokens,
                  num_samples=num_samples, placement=placement)
  samples, _ = decode(pop, state, key, row_ids, cfg=cfg, method=method,
                      max_new_tokens=max_new_tokens, stop_ids=tuple(stop_ids), pad_id=pad_id,
                      placement=placement)
  return samples


def left_pad(rows: list[list[int]], pad_id: int, length: int | None = None):
  """i32[B, T] tokens and bool[B, T] mask, rows aligned to the right."""
  if any(len(r) == 0 for r in rows):
    raise ValueError("a prompt tokenised to zero tokens; every prompt needs at least one")
  T = max(len(r) for r in rows) if length is None else length
  tokens = np.full((len(rows), T), pad_id, np.int32)
  mask = np.zeros((len(rows), T), bool)
  for i, r in enumerate(rows):
    tokens[i, T - len(r):] = r
    mask[i, T - len(r):] = True
  return tokens, mask
