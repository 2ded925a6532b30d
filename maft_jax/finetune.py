"""Population SFT: one jitted, vmapped train step for every agent at once.

Loss. Next-token cross-entropy on completion tokens only: token t is predicted
from position t-1 of the same packed segment, and counts when `loss_mask[t]`
is 1. Each agent's loss is (sum of its token NLLs) / (its token count) over
the whole step, microbatches included, so accumulating k microbatches is
exactly one k-times-larger batch. The cross-entropy is computed in chunks of
`ce_chunk` positions under `jax.checkpoint`, so [b, T, V] logits are never
held whole (forward or backward) for 150k-token vocabularies.

Optimizer. AdamW (optax `scale_by_adam` + decoupled `add_decayed_weights`),
per-agent global-norm clipping, and a per-agent learning rate: linear warmup
over `warmup_frac` of the agent's own step count, then cosine decay to 0.
fp32 master parameters; the forward runs in the model config's compute dtype.

Unequal data per agent (the policy). Every agent sees each of its own examples
once per epoch: nothing is truncated to the smallest agent and nothing is
repeated to match the largest. Agents with fewer batches finish early; from
then on their batches are empty and a step with zero loss tokens for an agent
leaves its parameters, optimizer state and step count bit-identical (selected
with `jnp.where`, not computed as a zero update: Adam's moments would still
decay). An agent with no data at all is never updated. Each agent's schedule
runs over its own number of steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from maft_jax import checks, model, population, sharding
from maft_jax.model import ModelConfig, Params


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hyper:
  """Paper defaults: lr 1e-5, 3% warmup, no weight decay."""
  learning_rate: float = 1e-5
  warmup_frac: float = 0.03
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  clip_norm: float = 1.0
  ce_chunk: int = 512

  def __post_init__(self):
    checks.check(self.learning_rate > 0, "learning_rate", self.learning_rate, "must be > 0")
    checks.check(0 <= self.warmup_frac < 1, "warmup_frac", self.warmup_frac, "must be in [0, 1)")
    checks.check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
    checks.check(self.clip_norm > 0, "clip_norm", self.clip_norm, "must be > 0")
    checks.at_least(self, 1, "ce_chunk")


def optimizer(h: Hyper) -> optax.GradientTransformation:
  """Everything but the learning rate, which `train_step` applies per agent."""
  return optax.chain(optax.clip_by_global_norm(h.clip_norm),
                     optax.scale_by_adam(b1=h.b1, b2=h.b2, eps=h.eps),
                     optax.add_decayed_weights(h.weight_decay))


def learning_rate(step, total_steps, h: Hyper):
  """Warmup then cosine to 0 over this agent's own `total_steps` updates."""
  step = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  warmup = jnp.maximum(jnp.round(h.warmup_frac * total), 1.0) if h.warmup_frac > 0 else 0.0
  warm = h.learning_rate * (step + 1) / jnp.maximum(warmup, 1.0)
  progress = jnp.clip((step - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
  cosine = 0.5 * h.learning_rate * (1 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup, warm, cosine)


def init_state(pop: Params, h: Hyper, total_steps) -> dict[str, Any]:
  """Train state of the population: params, per-agent optimizer state,
  per-agent update counts and schedule lengths. `train_step` donates the
  state, so `pop`'s buffers belong to it from then on."""
  A = population.num_agents(pop)
  low = sorted({str(x.dtype) for x in jax.tree.leaves(pop) if x.dtype != jnp.float32})
  if low:
    raise ValueError(
        f"trainable parameters are {low}, not float32: updates of lr x Adam step (~1e-5) round "
        "to nothing in bfloat16, so training would silently do almost nothing. Keep float32 "
        "master parameters (import with --param_dtype=float32) or train LoRA adapters.")
  total = np.broadcast_to(np.asarray(total_steps, np.int32), (A,))
  return {"params": pop, "opt": jax.vmap(optimizer(h).init)(pop),
          "step": jnp.zeros((A,), jnp.int32), "total_steps": jnp.asarray(total)}


def token_nll(params: Params, batch: dict[str, jax.Array], cfg: ModelConfig, ce_chunk: int,
              lora=None, lora_scale: float = 1.0):
  """(sum of completion-token NLLs, number of completion tokens) of one batch.
  With `lora`, `params` is the frozen base and `lora` the agent's adapters."""
  tokens, seg = batch["tokens_BxT"], batch["segment_ids_BxT"]
  hidden, _ = model.forward_hidden(params, tokens, cfg=cfg, positions_BxT=batch["positions_BxT"],
                                   segment_ids_BxT=seg, lora=lora, lora_scale=lora_scale)
  targets = tokens[:, 1:]
  weights = (batch["loss_mask_BxT"][:, 1:] != 0) & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
  h = hidden[:, :-1]
  T = h.shape[1]
  c = min(ce_chunk, T)
  pad = -T % c
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  n = h.shape[1] // c
  chunks = (h.reshape(h.shape[0], n, c, -1).swapaxes(0, 1),
            targets.reshape(targets.shape[0], n, c).swapaxes(0, 1),
            weights.reshape(weights.shape[0], n, c).swapaxes(0, 1))

  @jax.checkpoint  # recompute each chunk's logits in the backward pass
  def chunk_nll(h_c, t_c, w_c):
    logits = model.logits_from_hidden(params, h_c, cfg)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t_c[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(w_c, nll, 0.0))

  def body(total, chunk):
    return total + chunk_nll(*chunk), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
  return total, jnp.sum(weights).astype(jnp.int32)


def _agent_step(state, batches, base, *, cfg: ModelConfig, h: Hyper, lora_scale):
  """One agent's update from k microbatches [k, b, T]. With LoRA (`base` not
  None) the trainable `state["params"]` are the agent's adapters."""
  params = state["params"]

  def loss(p, batch):
    if base is None:
      return token_nll(p, batch, cfg, h.ce_chunk)
    return token_nll(base, batch, cfg, h.ce_chunk, lora=p, lora_scale=lora_scale)

  def micro(carry, batch):
    grads, nll, count = carry
    (s, n), g = jax.value_and_grad(loss, has_aux=True)(params, batch)
    return (jax.tree.map(jnp.add, grads, g), nll + s, count + n), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, nll, count), _ = jax.lax.scan(micro, (zeros, jnp.zeros((), jnp.float32),
                                                jnp.zeros((), jnp.int32)), batches)
  denom = jnp.maximum(count, 1).astype(jnp.float32)
  grads = jax.tree.map(lambda g: g / denom, grads)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  updates, opt = optimizer(h).update(grads, state["opt"], params)
  lr = learning_rate(state["step"], state["total_steps"], h)
  new_params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params, updates)
  has_data = count > 0
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(has_data, a, b), new, old)  # noqa
  new_state = {"params": keep(new_params, params), "opt": keep(opt, state["opt"]),
               "step": state["step"] + has_data.astype(jnp.int32),
               "total_steps": state["total_steps"]}
  metrics = {"loss": nll / denom, "tokens": count, "grad_norm": grad_norm, "lr": lr,
             "updated": has_data}
  return new_state, metrics


@functools.partial(jax.jit, static_argnames=("cfg", "h", "lora_scale", "placement"),
                   donate_argnames=("state",))
def train_step(state, batches, base=None, *, cfg: ModelConfig, h: Hyper, lora_scale: float = 1.0,
               placement: sharding.Placement = sharding.LOCAL):
  """Update every agent. batches: dict of [A, k, b, T] arrays (k microbatches).
  With LoRA, `state["params"]` holds the stacked adapters and `base` the one
  frozen base (no agent axis, shared by every agent, never donated).
  Returns the new state and per-agent metrics (loss, tokens, grad_norm, lr,
  updated)."""
  fn = functools.partial(_agent_step, cfg=cfg, h=h, lora_scale=lora_scale)
  with placement.tracing():
    new_state, metrics = jax.vmap(fn, in_axes=(0, 0, None),
                                  spmd_axis_name=placement.spmd_axis_name)(state, batches, base)
    if base is None:  # full finetuning: keep parameters and moments on the rule table's layout
      new_state = sharding.constrain_state(new_state, population.axes(cfg))
  return new_state, metrics


@functools.partial(jax.jit, static_argnames=("cfg", "ce_chunk"))
def eval_loss(pop: Params, batches, *, cfg: ModelConfig, ce_chunk: int = 512):
  """Per-agent mean completion-token NLL of [A, b, T] batches (no update)."""
  def one(params, batch):
    s, n = token_nll(params, batch, cfg, ce_chunk)
    return s / jnp.maximum(n, 1)
  return jax.vmap(one)(pop, batches)


class NonFiniteLoss(FloatingPointError):
  pass


def check_finite(metrics, step: int):
  """Raise naming the agents whose loss or gradient is not finite."""
  loss, gn = np.asarray(metrics["loss"]), np.asarray(metrics["grad_norm"])
  bad = [a for a in range(loss.shape[0]) if not (np.isfinite(loss[a]) and np.isfinite(gn[a]))]
  if bad:
    raise NonFiniteLoss(f"non-finite loss or gradient at step {step} for agent(s) {bad} "
                        f"(loss {loss.tolist()}, grad norm {gn.tolist()}); stopping without "
                        "saving, so the last checkpoint is the last good state")
