"""Per-device memory plan of a MAFT run, from abstract shapes alone.

`launch.train --dry_run` asks this module whether a config fits before any
weights are loaded. Parameters (the population's float32 master copy; with
LoRA one frozen base in its stored dtype plus every agent's float32
adapters), optimizer state and the sampler's KV cache are counted exactly
from their shapes and the rule table's shardings (`sharding.DEFAULT_RULES` on the run's
mesh): each leaf contributes its per-device shard. Temporaries come from
XLA's memory analysis of the compiled train step and of the compiled
prefill and decode programs, lowered from ShapeDtypeStructs (nothing is
allocated or run). A run has two phases that never overlap on a device:

  sampling  = parameters + KV cache + the larger of prefill/decode temporaries
              (decode's temporaries include the copy of the weights it reads,
              layer-major in the compute dtype: `sampling.decode_weights`)
  training  = parameters + optimizer state + train-step temporaries

and the plan fits when the larger phase fits the device. When parameters,
optimizer state and cache alone exceed the device, the plan says so without
compiling anything.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from maft_jax import finetune, lora, model, population, sampling, sft, sharding
from maft_jax.model import ModelConfig

GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device. `*_temp` are None when nothing was compiled."""
  devices: int
  mesh: dict[str, int]
  params: int
  opt_state: int
  kv_cache: int
  train_temp: int | None
  sample_temp: int | None
  capacity: int
  lora: bool = False                   # parameters are one base + stacked adapters

  @property
  def sampling(self) -> int:
    return self.params + self.kv_cache + (self.sample_temp or 0)

  @property
  def training(self) -> int:
    return self.params + self.opt_state + (self.train_temp or 0)

  @property
  def peak(self) -> int:
    return max(self.sampling, self.training)

  @property
  def fits(self) -> bool:
    return self.peak <= self.capacity

  def table(self) -> str:
    def gb(x):
      return "      -" if x is None else f"{x / GB:7.2f}"
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
    return "\n".join([
        f"memory plan per device ({self.devices} devices, mesh {mesh}), GB:",
        (f"  parameters (base+adapters){gb(self.params)}" if self.lora else
         f"  parameters (f32 master)   {gb(self.params)}"),
        f"  optimizer state           {gb(self.opt_state)}",
        f"  KV cache (sampling)       {gb(self.kv_cache)}",
        f"  train-step temporaries    {gb(self.train_temp)}",
        f"  sampling temporaries      {gb(self.sample_temp)}",
        f"  sampling phase            {gb(self.sampling)}",
        f"  training phase            {gb(self.training)}",
        f"  peak / capacity           {gb(self.peak)} / {self.capacity / GB:.2f}"
        f"  -> {'fits' if self.fits else 'DOES NOT FIT'}"])

  def advice(self) -> str:
    """What to turn when the plan does not fit."""
    knobs = []
    if self.opt_state + self.params > self.capacity / 2:
      knobs.append("more devices on FSDP (config.mesh.fsdp) or LoRA "
                   "(config.finetune.lora_rank=16: one base, adapters per agent)")
    if self.kv_cache + (self.sample_temp or 0) > self.capacity / 4:
      knobs.append("a smaller config.debate.batch_size / config.eval.batch_size")
    if (self.train_temp or 0) > self.capacity / 4:
      knobs.append("a smaller config.finetune.batch_size (with more finetune.grad_accum) or "
                   "config.model.remat=full")
    return "; ".join(knobs) or "more devices (config.mesh) or a smaller model"


def _bytes(tree) -> int:
  """Per-device bytes of abstract arrays that carry shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _placed(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def _temp(compiled) -> int:
  stats = compiled.memory_analysis()
  return int(getattr(stats, "temp_size_in_bytes", 0) or 0) if stats is not None else 0


def plan_memory(cfg: ModelConfig, *, agents: int, placement: sharding.Placement,
                sample_batch: int, prompt_len: int, max_new_tokens: int,
                sample_agents: int | None = None,
                train_batch: int, grad_accum: int, seq_len: int, hyper: finetune.Hyper,
                lora_config: lora.LoraConfig | None, capacity: int, compile: bool = True,
                methods: Sequence = (sampling.Temperature(1.0),),
                log: Callable[[str], None] = lambda m: None) -> MemoryPlan:
  """The plan of one MAFT run (see the module docstring); decode is compiled
  once per distinct sampling method (top-p adds [rows, vocab] temporaries).
  `sample_agents`: how many agents sample in one program (a debate samples
  its N generators, then its N critics; default: all)."""
  A, mesh = agents, placement.mesh
  S = sample_agents or A
  if lora_config is None:
    pop_abs = population.shapes(cfg, A)
  else:  # one base (cfg.param_dtype: as stored) and every agent's adapters
    pop_abs = population.Adapted(
        base=model.param_shapes(cfg),
        adapters=jax.eval_shape(lambda: lora.init(cfg, lora_config, jax.random.key(0), A)),
        scale=lora_config.scale)
  pop = _placed(pop_abs, placement.shardings(population.logical_axes(pop_abs, cfg), pop_abs))
  params = _bytes(pop)

  # Optimizer state: of the parameters, or of the per-agent adapters (LoRA).
  if lora_config is None:
    trainable, axes = pop_abs, population.axes(cfg)
  else:
    trainable, axes = pop_abs.adapters, lora.stacked_axes(lora_config.targets)
  state_abs = jax.eval_shape(lambda p: finetune.init_state(p, hyper, 1), trainable)
  state = _placed(state_abs, placement.state_shardings(state_abs, axes))
  opt_state = _bytes(state) - _bytes(state["params"])

  cache_len = prompt_len + max_new_tokens
  # The decode state's layout: k/v layer-major (`sampling.DecodeState`).
  state_axes = sampling.STATE_AXES.cache()
  cache_abs = jax.eval_shape(lambda: jax.vmap(
      lambda _: model.init_cache(cfg, sample_batch, cache_len),
      out_axes=state_axes)(jnp.arange(S)))
  cache_axes = {k: v if state_axes[k] is None else
                v[:state_axes[k]] + ("agent",) + v[state_axes[k]:]
                for k, v in model.cache_axes().items()}
  cache = _placed(cache_abs, placement.shardings(cache_axes, cache_abs))
  kv_cache = _bytes(cache)

  result = MemoryPlan(devices=mesh.devices.size, mesh=dict(mesh.shape), params=params,
                      opt_state=opt_state, kv_cache=kv_cache, train_temp=None,
                      sample_temp=None, capacity=capacity, lora=lora_config is not None)
  if not compile or result.peak > capacity:
    return result  # already too big (or not asked): nothing to compile

  with placement.context():
    spec = placement.spec(sft.BATCH_AXES, (A, grad_accum, train_batch, seq_len))
    batch = {k: jax.ShapeDtypeStruct((A, grad_accum, train_batch, seq_len), jnp.int32,
                                     sharding=jax.sharding.NamedSharding(mesh, spec))
             for k in sft.BATCH_KEYS}
    base = pop.base if lora_config is not None else None
    log("dry run: compiling the train step")
    train_temp = _temp(finetune.train_step.lower(
        state, batch, base, cfg=cfg, h=hyper,
        lora_scale=lora_config.scale if lora_config else 1.0,
        placement=placement).compile())

    rows = jax.sharding.NamedSharding(mesh, placement.spec(("batch", "length"),
                                                           (sample_batch, prompt_len)))
    prompts = jax.ShapeDtypeStruct((sample_batch, prompt_len), jnp.int32, sharding=rows)
    mask = jax.ShapeDtypeStruct((sample_batch, prompt_len), jnp.bool_, sharding=rows)
    log("dry run: compiling prefill and decode")
    speakers_abs = jax.eval_shape(lambda p: population.take(p, 0, S), pop_abs)
    speakers = _placed(speakers_abs, placement.shardings(
        population.logical_axes(speakers_abs, cfg), speakers_abs))
    prefill = sampling.prefill.lower(speakers, prompts, mask, cfg=cfg, cache_len=cache_len,
                                     placement=placement).compile()
    state_out = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(lambda p, t, m: sampling.prefill(p, t, m, cfg=cfg, cache_len=cache_len),
                       speakers_abs, prompts, mask),
        prefill.output_shardings)
    decode_temp = max(_temp(sampling.decode.lower(
        speakers, state_out, jax.random.key(0), cfg=cfg, method=method,
        max_new_tokens=max_new_tokens, placement=placement).compile())
        for method in dict.fromkeys(methods))
  return dataclasses.replace(result, train_temp=train_temp,
                             sample_temp=max(_temp(prefill), decode_temp))


def model_config(plan) -> ModelConfig:
  """A `config.Plan`'s model architecture and numerics, without reading any
  weights: float32 master parameters, or with LoRA the dtype the frozen base
  is stored in (what `loop.base_source` holds it in)."""
  from maft_jax import checkpoint, hf  # deferred: checkpoint reading pulls in orbax
  m = plan.model
  stored = "float32"
  if m.source == "hf":
    hf_config = hf.read_config(m.path)
    cfg = hf.config_from_hf(hf_config, dtype=m.dtype, param_dtype="float32",
                            where=f"{m.path}/config.json")
    try:  # the weights' own dtype; a directory with config.json alone: what it declares
      stored = hf.tensors_dtype(hf.read_tensors(m.path)[0])
    except hf.HFError:
      declared = hf_config.get("torch_dtype") or hf_config.get("dtype")
      stored = declared if declared in hf.DTYPES else "float32"
  elif m.source == "checkpoint":
    cfg = checkpoint.read_meta(m.path).cfg
    stored = cfg.param_dtype
    cfg = dataclasses.replace(cfg, dtype=m.dtype, param_dtype="float32")
  else:  # a builder (maft_jax.builders): the architecture it would build (stored in float32)
    from maft_jax import builders
    cfg = hf.config_from_hf(builders.get(m.source).architecture(m.demo_preset), dtype=m.dtype,
                            param_dtype="float32")
  param_dtype = stored if plan.finetune.sft.lora is not None else "float32"
  return dataclasses.replace(cfg, remat=m.remat, param_dtype=param_dtype)


def plan_run(plan, *, capacity: int, compile: bool = True,
             log: Callable[[str], None] = logging.info) -> MemoryPlan:
  """`plan_memory` for a `config.Plan` on its mesh: sampling N agents (the
  generators, then the critics) at the larger of the debate's and
  evaluation's batch and lengths (prompts as long as a
  finetuning row leaves room for), training at finetune.batch_size x
  grad_accum x seq_len."""
  d, e, s = plan.debate.options, plan.eval.options, plan.finetune.sft
  new_tokens = max(d.max_new_tokens, e.max_new_tokens)
  placement = sharding.Placement(sharding.make_mesh(plan.mesh))
  return plan_memory(
      model_config(plan), agents=plan.num_agents, sample_agents=plan.agents.generators,
      placement=placement, sample_batch=max(d.batch_size, e.batch_size), prompt_len=s.seq_len - new_tokens,
      max_new_tokens=new_tokens, train_batch=s.batch_size, grad_accum=s.grad_accum,
      seq_len=s.seq_len, hyper=s.hyper, lora_config=s.lora, capacity=capacity,
      compile=compile, methods=(d.method, e.method), log=log)
