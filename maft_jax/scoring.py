"""Jitted batched scoring over the population: votes, consensus, selection
masks and the cross-agent NLL matrix.

Answers are numbered per problem on the host, by the task's answer relation
(`Task.answer_classes`, see `verdict`); every decision after that is a
jitted function of integer id arrays:

    consensus(ids_AxB, key)            -> consensus_B, votes_B   (-1: no answer)
    agreement(ids_xB, target_B)        -> bool[..., B]
    paper_selection(...)               -> D^G, D^C-, D^C+ masks   bool[N, B]
    cross_agent_weights(...)           -> f32[A, A', B] training weights
    row_nll(pop, batches)              -> NLL sums, counts [A_scorer, A_author, b]
    text_nll(pop, rows, ...)           -> the same of (messages, response) rows, chunked

Ties are broken by a seeded random choice among the tied answers (random
priorities drawn from `key`), never by answer order.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from maft_jax import distributed, finetune, generation, population, sharding
from maft_jax.model import ModelConfig
from maft_jax.population import Population
from maft_jax.tasks import prompts

NO_ANSWER = -1


@jax.jit
def consensus(ids_AxB: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Majority answer id per problem (-1 when nobody answered) and its votes.

  Ids are any non-negative integers (answer classes numbered over several
  rounds at once may exceed A); each agent's answer counts the agents that
  share it. A tie is broken by a seeded uniform choice among the tied
  answers: a uniform agent among those holding a tied answer, which is
  uniform over the answers because each of them has the same votes."""
  answered = ids_AxB >= 0
  same = (ids_AxB[:, None, :] == ids_AxB[None, :, :]) & answered[None, :, :]  # [A, A', B]
  votes_AxB = jnp.where(answered, jnp.sum(same, axis=1), 0)
  top_B = jnp.max(votes_AxB, axis=0)
  tied_AxB = (votes_AxB == top_B[None, :]) & (top_B[None, :] > 0)
  noise = jax.random.uniform(key, votes_AxB.shape)                 # seeded tie-break
  pick_B = jnp.argmax(jnp.where(tied_AxB, noise, -1.0), axis=0)
  winner_B = jnp.take_along_axis(ids_AxB, pick_B[None, :], axis=0)[0]
  has = top_B > 0
  return jnp.where(has, winner_B, NO_ANSWER), jnp.where(has, top_B, 0)


@jax.jit
def agreement(ids_xB: jax.Array, target_B: jax.Array) -> jax.Array:
  """bool[..., B]: each answer (any leading axes: agents, rounds) equals the
  problem's target (never for no answer)."""
  return (ids_xB == target_B) & (ids_xB >= 0)


@functools.partial(jax.jit, static_argnames=("critic_weight",))
def paper_selection(gen_ok_NxB, critic_first_ok_NxB, critic_final_ok_NxB, key, *,
                    critic_weight: float = 0.5):
  """The paper's per-agent datasets, as masks over problems.

  gen_ok: generator n's round-1 answer agrees (with consensus, or with the
  reference in `ground_truth` mode) -> D^G_n. For critic n, D^C-_n are the
  transcripts it corrected (round 1 wrong, final round right) and D^C+_n those
  that stayed right; the critic's set mixes them so that corrected ones make
  up `critic_weight` of it where possible: all of D^C-_n, and a seeded random
  subset of D^C+_n of size |D^C-_n| (1-w)/w (all of it when that is larger;
  with no corrections, w=0.5 keeps half of D^C+_n, so critics still train).
  Returns (d_g, d_c_minus, d_c_plus, d_c_plus_kept), each bool[N, B].
  """
  d_g = gen_ok_NxB
  d_minus = ~critic_first_ok_NxB & critic_final_ok_NxB
  d_plus = critic_first_ok_NxB & critic_final_ok_NxB
  n_minus = jnp.sum(d_minus, axis=1, keepdims=True).astype(jnp.float32)
  n_plus = jnp.sum(d_plus, axis=1, keepdims=True).astype(jnp.float32)
  w = critic_weight
  # The epsilon keeps float rounding (13 * 0.8 / 0.2 = 52.000004) from adding one.
  want = jnp.where(n_minus > 0, jnp.ceil(n_minus * (1 - w) / w - 1e-4),
                   jnp.ceil(n_plus * (1 - w) - 1e-4))
  # Keep the `want` D^C+ problems with the smallest random priorities.
  prio = jnp.where(d_plus, jax.random.uniform(key, d_plus.shape), jnp.inf)
  rank = jnp.argsort(jnp.argsort(prio, axis=1), axis=1)
  kept = d_plus & (rank < want)
  return d_g, d_minus, d_plus, kept


@functools.partial(jax.jit, static_argnames=("temperature",))
def cross_agent_weights(correct_AxB, nll_AxA_B, *, temperature: float = 1.0):
  """Training weights for the cross-agent variant: w[a, a', b] is how much
  agent a trains on agent a''s verified response to problem b.

  Only verified responses carry weight. Agent a's weight on a response grows
  when a failed the problem itself (specialise where weak: factor 2 vs 1)
  and when a finds the response unlikely (its NLL under a, softmaxed over
  the verified authors at `temperature`); each agent's weights over a
  problem's verified responses sum to that factor, and its own verified
  response always keeps weight at least 1 (it keeps its own successes).
  nll_AxA_B[a, a', b]: per-token NLL of author a''s response b under agent a.
  """
  ok = correct_AxB[None, :, :]                                   # author verified [1, A', B]
  logits = jnp.where(ok, nll_AxA_B / temperature, -jnp.inf)
  has_any = jnp.any(ok, axis=1, keepdims=True)
  soft = jnp.where(has_any, jax.nn.softmax(jnp.where(has_any, logits, 0.0), axis=1), 0.0)
  factor = jnp.where(correct_AxB, 1.0, 2.0)[:, None, :]          # a failed b -> 2
  w = soft * factor
  A = correct_AxB.shape[0]
  own = jnp.eye(A, dtype=bool)[:, :, None] & ok
  return jnp.where(own, jnp.maximum(w, 1.0), w)


@functools.partial(jax.jit, static_argnames=("cfg", "ce_chunk", "placement"))
def row_nll(pop: Population, batches, *, cfg: ModelConfig, ce_chunk: int = 512,
            placement: sharding.Placement = sharding.LOCAL):
  """Per-row completion NLL sums f32[A_scorer, A_author, b] and token counts
  i32[A_scorer, A_author, b] of every author's rows (batches: dict of
  [A_author, b, T], SFT layout, one example per row) under every agent.
  The scorers are split over `placement`'s agent axis, as in
  `finetune.train_step`."""
  def one_row(agent, row):
    params, lora, scale = population.parts(agent)
    return finetune.token_nll(params, {k: v[None] for k, v in row.items()}, cfg, ce_chunk,
                              lora=lora, lora_scale=scale)
  per_author = jax.vmap(jax.vmap(one_row, in_axes=(None, 0)), in_axes=(None, 0))
  with placement.tracing():
    return jax.vmap(per_author, in_axes=(population.vmap_axes(pop), None),
                    spmd_axis_name=placement.spmd_axis_name)(pop, batches)


def scoring_rows(prompt_ids: Sequence[int], completion_ids: Sequence[int], seq_len: int,
                 pad_id: int) -> dict[str, np.ndarray]:
  """One right-padded SFT row [seq_len] for scoring a response: the prompt
  loses tokens from the left and then the completion from the right when
  the pair is longer than `seq_len`; an empty completion carries no loss."""
  completion = list(completion_ids)[:max(seq_len - 1, 0)]
  prompt = list(prompt_ids)[-max(seq_len - len(completion), 1):] if prompt_ids else []
  ids = (prompt + completion)[:seq_len]
  n = len(ids)
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:n] = ids
  loss = np.zeros(seq_len, np.int32)
  loss[len(prompt):n] = 1
  seg = np.zeros(seq_len, np.int32)
  seg[:n] = 1
  pos = np.zeros(seq_len, np.int32)
  pos[:n] = np.arange(n)
  return {"tokens_BxT": tokens, "loss_mask_BxT": loss, "segment_ids_BxT": seg,
          "positions_BxT": pos}


def text_nll(pop: Population, rows, *, cfg: ModelConfig, tokenizer, pad_id: int, max_len: int,
             chunk: int, ce_chunk: int = 512, placement: sharding.Placement = sharding.LOCAL
             ) -> tuple[np.ndarray, np.ndarray]:
  """Every agent's NLL of every author's responses: rows[author][b] =
  (messages, response) -> per-row NLL sums f32[A_scorer, A_author, b] and
  token counts i32[A_scorer, A_author, b] (host arrays).

  Prompts are rendered as they were sampled (`prompts.to_text`); rows are as
  long as the longest pair needs (bucketed, at most `max_len`), scored
  `chunk` problems at a time in one compiled shape (the last chunk padded
  with rows that carry no loss and are dropped)."""
  def ids(messages, response):
    text, special = prompts.to_text(messages, tokenizer)
    return (tokenizer.encode(text, add_special_tokens=special),
            tokenizer.encode(response, add_special_tokens=False))

  pairs = [[ids(m, t) for m, t in author] for author in rows]
  longest = max(len(p) + len(c) for author in pairs for p, c in author)
  T = min(generation.bucket_length(longest, 16), max_len)
  encoded = [[scoring_rows(p, c, T, pad_id) for p, c in author] for author in pairs]
  B = len(encoded[0])
  chunk = min(chunk, B)  # one compiled shape; no all-padding rows
  empty = scoring_rows([], [], T, pad_id)
  sums, counts = [], []
  for c in range(0, B, chunk):
    part = [a[c:c + chunk] for a in encoded]
    pad = chunk - len(part[0])
    # [A_author, chunk, T]: every scorer reads every author's rows.
    batch = {key: placement.put(
        np.stack([np.stack([r[key] for r in a] + [empty[key]] * pad) for a in part]),
        (None, "batch", "length")) for key in empty}
    s, n = row_nll(pop, batch, cfg=cfg, ce_chunk=ce_chunk, placement=placement)
    sums.append(distributed.to_host(s)[..., :chunk - pad])
    counts.append(distributed.to_host(n)[..., :chunk - pad])
  return np.concatenate(sums, -1), np.concatenate(counts, -1)
