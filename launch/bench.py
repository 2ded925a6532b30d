r"""Benchmarks, measured side by side in one process on one card.

    python -m launch.bench --what=sample [--tiny] [--peer] [--lora]
    python -m launch.bench --what=train [--tiny] [--peer]
    python -m launch.bench --what=train --lora_only --arch=llama-3-8b --agents=8 --train_batch=4

`--what=sample` runs the reference sampling workload: Qwen2-0.5B
architecture, random init, bf16, 64 prompts of 128 tokens per agent, 256 new
tokens (EOS disabled), T=0.8, top-p 0.95, for A = 1, 2, 4, 8 agents. It
measures the card's two ceilings in the same run (elementwise read+write
bandwidth, bf16 matmul rate) and prints, per A: generated tok/s, the fraction
of the roofline (parameter and live-KV bytes every decode step must read over
the measured bandwidth, plus prefill FLOPs over the measured matmul rate),
and the ratio of the vmapped population against the same agents sampled one
after another. `--peer` also runs benchmarks/peers/hf_generate_peer.py (HF
transformers `generate`, one model per agent; PyTorch on the card) in the same
command and prints our ratio against it. `--lora` also samples, per A, one
shared base with A rank-16 adapters (`population.Adapted`: the base is read
once per step for every agent) and prints its tok/s, roofline fraction, step
time against the first A and speed against the A full copies.

`--what=train` runs the reference training workload: Qwen2-0.5B architecture,
16 sequences of 1024 tokens per agent per step, bf16 compute, fp32 master
weights and AdamW state, for A = 1, 2, 4, 8 agents, plus LoRA rows (rank 16,
all projections, one shared frozen base held in bf16). `--lora_only` runs
only LoRA rows, one per --agents count: the memory check for many agents of
a 7-8B model on one card (with --what=sample: LoRA sampling alone, where A
full copies would not fit). It prints trained tok/s, MFU
(6·P·tokens over the card's dense bf16 peak: --peak_tflops, default the
datasheet value for H100/H200, else the matmul rate measured in the run), the
vmapped-vs-sequential ratio and peak device memory; `--peer` also runs
benchmarks/peers/hf_train_peer.py --compile (the file beside --peer_script)
in the same command.

The peers are separate PyTorch + transformers programs (see
benchmarks/peers/README.md), run as subprocesses with this interpreter; they
need torch and transformers, which the library itself never imports.

`--tiny` is a CPU-sized version of all of it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from maft_jax import lora, model, population, presets, sampling

_WHAT = flags.DEFINE_enum("what", "sample", ["sample", "train"], "Which benchmark.")
_SEQ = flags.DEFINE_integer("seq", None, "Train: tokens per sequence (default 1024; tiny 64).")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", None,
                                    "Train: sequences per agent per step (default 16; tiny 4).")
_REMAT = flags.DEFINE_enum("remat", "dots_no_batch", ["none", "full", "dots", "dots_no_batch"],
                           "Train: rematerialisation policy.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Train: dense bf16 peak of the card.")
_TINY = flags.DEFINE_bool("tiny", False, "CPU-sized workload.")
_LORA = flags.DEFINE_bool("lora", False, "Sample: also LoRA populations (one base + A rank-16 "
                          "adapters) for every A, side by side with the full copies.")
_LORA_ONLY = flags.DEFINE_bool("lora_only", False, "Only the LoRA rows, for every --agents "
                               "count (train: e.g. 8 agents of --arch=llama-3-8b on one card; "
                               "sample: where A full copies do not fit).")
_PEER = flags.DEFINE_bool("peer", False, "Also run the HF peer (benchmarks/peers/) in this "
                          "command: hf_generate_peer.py for sample, hf_train_peer.py for train.")
_AGENTS = flags.DEFINE_list("agents", None, "Agent counts (default 1,2,4,8; tiny 1,2).")
_ARCH = flags.DEFINE_string("arch", "qwen2-0.5b", "Preset architecture.")
_BATCH = flags.DEFINE_integer("batch", None, "Prompts per agent (default 64; tiny 4).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", None, "Prompt tokens (default 128; tiny 16).")
_NEW = flags.DEFINE_integer("new_tokens", None, "New tokens (default 256; tiny 16).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_DUMP_HLO = flags.DEFINE_string(
    "dump_hlo", None, "Write the compiled (optimised) HLO of the A=4 decode loop (sample) or "
    "train step (train) here, gzipped: what the card's compiler made of it, to read offline.")
PEERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "peers")
_PEER_SCRIPT = flags.DEFINE_string(
    "peer_script", os.path.normpath(os.path.join(PEERS_DIR, "hf_generate_peer.py")),
    "The HF generate peer (default: benchmarks/peers/ in this repository); --what=train runs "
    "hf_train_peer.py from the same directory.")

TINY_CFG = model.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
                             num_heads=4, num_kv_heads=2, head_dim=16, dtype="bfloat16",
                             param_dtype="bfloat16")


def dump_hlo(lowered) -> None:
  """Compile `lowered` again and write its optimised HLO to --dump_hlo."""
  import gzip
  with gzip.open(_DUMP_HLO.value, "wt") as f:
    f.write(lowered.compile().as_text())
  print(f"wrote the compiled HLO to {_DUMP_HLO.value}", flush=True)


def median_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up: compile outside the timing
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def measure_bandwidth(nbytes: int, repeats: int) -> float:
  """Bytes/s of an elementwise read+write pass (counting both)."""
  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  return 2 * nbytes / median_time(lambda: f(x), repeats)


def measure_matmul(n: int, repeats: int) -> float:
  """FLOP/s of an n^3 bf16 matmul."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: a @ b)
  return 2 * n ** 3 / median_time(lambda: f(a, b), repeats)


def kv_bytes_per_token(cfg: model.ModelConfig) -> int:
  return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def roofline_seconds(cfg, step_params: int, agent_params: int, A: int, B: int, T: int, N: int,
                     bw: float, flops: float) -> float:
  """Floor: every decode step reads `step_params` weights (all agents' copies,
  or one base plus every agent's adapters) and the live KV cache; prefill
  does 2 * agent_params FLOPs per prompt token of each agent."""
  param_bytes = step_params * jnp.dtype(cfg.param_dtype).itemsize
  kv_tokens = A * B * (N * T + N * (N - 1) / 2)  # live cache summed over the N steps
  decode = (N * param_bytes + kv_tokens * kv_bytes_per_token(cfg)) / bw
  prefill = 2 * agent_params * A * B * T / flops
  return decode + prefill


def run_peer(arch: str, A: int, B: int, T: int, N: int) -> float | None:
  script = os.path.abspath(_PEER_SCRIPT.value)
  if not os.path.isfile(script):
    print(f"peer: {script} not found", flush=True)
    return None
  cmd = [sys.executable, script, "--arch", arch, "--agents", str(A), "--batch", str(B),
         "--prompt_len", str(T), "--new_tokens", str(N), "--cache", "dynamic"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  print(_peer_output(proc), flush=True)
  m = re.search(r"([\d.]+) tok/s", proc.stdout)
  return float(m.group(1)) if m else None


def _peer_output(proc: subprocess.CompletedProcess) -> str:
  """The peer's report, or on failure its exit status and last error line
  (a traceback would push our own table out of a log's tail)."""
  if proc.returncode == 0 and proc.stdout.strip():
    return proc.stdout.strip()
  last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
  return f"peer failed (exit {proc.returncode}): {last}"


def bench_sample():
  tiny = _TINY.value
  cfg = TINY_CFG if tiny else presets.model_config(_ARCH.value, dtype="bfloat16",
                                                   param_dtype="bfloat16")
  agents = [int(a) for a in (_AGENTS.value or (["1", "2"] if tiny else ["1", "2", "4", "8"]))]
  B = _BATCH.value or (4 if tiny else 64)
  T = _PROMPT_LEN.value or (16 if tiny else 128)
  N = _NEW.value or (16 if tiny else 256)
  repeats = _REPEATS.value
  method = sampling.Chain((sampling.Temperature(0.8), sampling.TopP(0.95)))
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  bw = measure_bandwidth((64 if tiny else 2048) * 2**20, repeats)
  flops = measure_matmul(1024 if tiny else 8192, repeats)
  print(f"ceilings: {bw / 1e12:.3f} TB/s read+write, {flops / 1e12:.1f} TFLOP/s bf16 matmul",
        flush=True)
  num_params = model.count_params(model.param_shapes(cfg))
  prompts = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size, jnp.int32)
  mask = jnp.ones((B, T), bool)
  kw = dict(cfg=cfg, method=method, max_new_tokens=N, stop_ids=(), pad_id=0)

  rows = []
  for A in [] if _LORA_ONLY.value else agents:
    pop = population.init(cfg, jax.random.key(1), A)
    run = lambda p=pop: sampling.sample(p, prompts, mask, jax.random.key(2), **kw).tokens  # noqa
    t_pop = median_time(run, repeats)
    # The same agents one after another (each its own 1-agent program call),
    # each sliced out as it is used, so memory holds one more agent, not A.
    t_seq = median_time(lambda: [sampling.sample(population.take(pop, i, i + 1), prompts, mask,
                                                 jax.random.key(2), **kw).tokens
                                 for i in range(A)], repeats)
    floor = roofline_seconds(cfg, A * num_params, num_params, A, B, T, N, bw, flops)
    rows.append((A, A * B * N / t_pop, floor / t_pop, t_seq / t_pop, t_pop))
    del pop
  lora_rows = bench_sample_lora(cfg, agents, prompts, mask, kw, dict((r[0], r[4]) for r in rows),
                                bw, flops) if _LORA.value or _LORA_ONLY.value else []
  print(f"\nsampling: {'tiny' if tiny else _ARCH.value} ({num_params / 1e6:.1f}M params/agent), "
        f"{B} prompts x {T} tokens per agent, {N} new tokens, T=0.8 top-p 0.95, bf16")
  if rows:
    print(f"{'agents':>6} {'tok/s':>12} {'roofline':>9} {'vs sequential':>14} {'seconds':>8}")
  for A, tps, frac, ratio, t in rows:
    print(f"{A:>6} {tps:>12,.0f} {frac:>8.1%} {ratio:>13.2f}x {t:>8.3f}")
  if lora_rows:
    print(f"\nLoRA populations: one base + A rank-{LORA_SAMPLE.rank} adapters on every "
          "projection (a base read once per step for all agents)")
    print(f"{'agents':>6} {'tok/s':>12} {'roofline':>9} {f'step vs A={agents[0]}':>12} "
          f"{'vs full copies':>15} {'seconds':>8}")
    for A, tps, frac, per_step, vs_full, t in lora_rows:
      full = f"{vs_full:>14.2f}x" if vs_full is not None else f"{'-':>15}"
      print(f"{A:>6} {tps:>12,.0f} {frac:>8.1%} {per_step:>11.2f}x {full} {t:>8.3f}")
  print(top_p_line(method, rows=4 * B, vocab=cfg.vocab_size, repeats=repeats))
  if _DUMP_HLO.value:
    pop = population.shapes(cfg, 4)
    state = jax.eval_shape(lambda p: sampling.prefill(p, prompts, mask, cfg=cfg,
                                                      cache_len=T + N), pop)
    dump_hlo(sampling.decode.lower(pop, state, jax.random.key(2), cfg=cfg, method=method,
                                   max_new_tokens=N))
  if _PEER.value and rows:
    A_ref = 4 if 4 in agents else agents[-1]
    peer = run_peer(_ARCH.value, A_ref, B, T, N)
    ours = dict((r[0], r[1]) for r in rows)[A_ref]
    if peer:
      print(f"peer ratio at A={A_ref}: {ours:,.0f} / {peer:,.0f} = {ours / peer:.1f}x")


LORA_SAMPLE = lora.LoraConfig(rank=16, alpha=32.0)


def bench_sample_lora(cfg, agents, prompts, mask, kw, full_seconds, bw, flops):
  """Per A: the same sampling workload on one base + A adapters (random, so
  every agent differs). Rows: (A, tok/s, roofline fraction, seconds over
  the first A's, full copies' seconds over these)."""
  B, T = prompts.shape
  N = kw["max_new_tokens"]
  base = model.init_params(cfg, jax.random.key(1))
  num_params = model.count_params(base)
  out, first = [], None
  for A in agents:
    adapters = lora.init(cfg, LORA_SAMPLE, jax.random.key(5), A, dtype=cfg.param_dtype)
    # lora.init's B is zero; a nonzero B makes the agents differ (same cost).
    adapters = jax.tree.map(lambda x: x + jnp.asarray(0.01, x.dtype), adapters)
    pop = population.Adapted(base=base, adapters=adapters, scale=LORA_SAMPLE.scale)
    run = lambda p=pop: sampling.sample(p, prompts, mask, jax.random.key(2), **kw).tokens  # noqa
    t = median_time(run, _REPEATS.value)
    first = first or t
    per_agent = lora.count(adapters) // A
    floor = roofline_seconds(cfg, num_params + A * per_agent, num_params + per_agent, A, B, T, N,
                             bw, flops)
    full = full_seconds[A] / t if A in full_seconds else None  # None: --lora_only
    out.append((A, A * B * N / t, floor / t, t / first, full, t))
    del pop, adapters
  return out


def top_p_line(method, *, rows: int, vocab: int, repeats: int) -> str:
  """One draw per row of [rows, vocab] logits, by the sampler's sort-free
  rounds and by a sort (categorical of the sorted nucleus): what a decode
  step of 4 agents spends choosing its tokens."""
  logits = jax.random.normal(jax.random.key(3), (rows, vocab), jnp.float32)
  keys = jax.random.split(jax.random.key(4), rows)
  rounds = jax.jit(lambda l, k: sampling.draw_rows(method, l, k))
  sort = jax.jit(lambda l, k: jax.vmap(jax.random.categorical)(k, method.process(l)))
  t_rounds = median_time(lambda: rounds(logits, keys), repeats)
  t_sort = median_time(lambda: sort(logits, keys), repeats)
  return (f"top-p draw of [{rows}, {vocab}] logits: {t_rounds * 1e3:.2f} ms by rounds, "
          f"{t_sort * 1e3:.2f} ms with a sort")


DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0}


def peak_flops(measured: float) -> tuple[float, str]:
  if _PEAK.value:
    return _PEAK.value * 1e12, "--peak_tflops"
  kind = jax.devices()[0].device_kind
  for name, tflops in DATASHEET_TFLOPS.items():
    if name in kind:
      return tflops * 1e12, f"{name} datasheet"
  return measured, "measured matmul"


def peak_memory() -> str:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return f"{peak / 2**30:.1f} GiB" if peak else "n/a"


def bench_train():
  from maft_jax import finetune
  tiny = _TINY.value
  base_cfg = TINY_CFG if tiny else presets.model_config(_ARCH.value)
  cfg = dataclasses.replace(base_cfg, dtype="bfloat16", param_dtype="float32",
                            remat=_REMAT.value)
  agents = [int(a) for a in (_AGENTS.value or (["1", "2"] if tiny else ["1", "2", "4", "8"]))]
  B = _TRAIN_BATCH.value or (4 if tiny else 16)
  T = _SEQ.value or (64 if tiny else 1024)
  repeats = _REPEATS.value
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}",
        flush=True)
  flops, source = peak_flops(measure_matmul(1024 if tiny else 8192, repeats))
  print(f"peak: {flops / 1e12:.1f} TFLOP/s bf16 ({source})", flush=True)
  P = model.count_params(model.param_shapes(cfg))
  h = finetune.Hyper(learning_rate=1e-5, ce_chunk=256 if tiny else 1024)

  def batch_for(A):
    tokens = jax.random.randint(jax.random.key(0), (A, 1, B, T), 0, cfg.vocab_size, jnp.int32)
    ones = jnp.ones_like(tokens)
    return {"tokens_BxT": tokens, "loss_mask_BxT": ones, "segment_ids_BxT": ones,
            "positions_BxT": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)}

  def time_steps(state, batch, base=None, scale=1.0):
    holder = {"state": state}

    def step():
      holder["state"], m = finetune.train_step(holder["state"], batch, base, cfg=cfg, h=h,
                                               lora_scale=scale)
      return m["loss"]
    return median_time(step, repeats)

  rows = []
  for A in ([] if _LORA_ONLY.value else agents):
    state = finetune.init_state(population.init(cfg, jax.random.key(1), A), h, 100)
    t = time_steps(state, batch_for(A))
    del state
    singles = [finetune.init_state(population.init(cfg, jax.random.key(1 + i), 1), h, 100)
               for i in range(A)]
    one = batch_for(1)
    t_seq = sum(time_steps(s, one) for s in singles)
    del singles
    tokens = A * B * T
    rows.append((f"full A={A}", tokens / t, 6 * P * tokens / t / flops, t_seq / t, peak_memory()))
  lcfg = lora.LoraConfig(rank=16, alpha=32.0)
  # The frozen base needs no f32 master copy: bf16 halves its memory.
  base = model.init_params(dataclasses.replace(cfg, param_dtype="bfloat16"), jax.random.key(2))
  for A in agents if _LORA_ONLY.value else [a for a in agents if a >= 2][-2:] or agents[-1:]:
    adapters = lora.init(cfg, lcfg, jax.random.key(3), A)
    state = finetune.init_state(adapters, h, 100)
    t = time_steps(state, batch_for(A), base, lcfg.scale)
    tokens = A * B * T
    # LoRA's model FLOPs: the full forward and input-gradient backward (4·P per
    # token) plus the adapters' own 6·P_lora; reported against 6·P like the peer.
    rows.append((f"LoRA r16 A={A}", tokens / t, 6 * P * tokens / t / flops, float("nan"),
                 peak_memory()))
  print(f"\ntraining: {'tiny' if tiny else _ARCH.value} ({P / 1e6:.1f}M params/agent), "
        f"{B} x {T} tokens per agent per step, bf16 compute, fp32 master + AdamW, "
        f"remat={_REMAT.value}")
  print(f"{'run':>14} {'tok/s':>12} {'MFU':>7} {'vs sequential':>14} {'peak mem':>10}")
  for name, tps, mfu, ratio, mem in rows:
    ratio_s = "" if ratio != ratio else f"{ratio:.2f}x"
    print(f"{name:>14} {tps:>12,.0f} {mfu:>6.1%} {ratio_s:>14} {mem:>10}")
  if _DUMP_HLO.value:
    state = jax.eval_shape(lambda p: finetune.init_state(p, h, 100), population.shapes(cfg, 4))
    dump_hlo(finetune.train_step.lower(state, batch_for(4), cfg=cfg, h=h))
  if _PEER.value and not _LORA_ONLY.value:
    script = os.path.join(os.path.dirname(os.path.abspath(_PEER_SCRIPT.value)),
                          "hf_train_peer.py")
    A_ref = 4 if 4 in agents else agents[-1]
    cmd = [sys.executable, script, "--arch", _ARCH.value, "--agents", str(A_ref), "--batch",
           str(B), "--seq", str(T), "--compile"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(_peer_output(proc), flush=True)
    m = re.search(r"([\d.]+) tok/s", proc.stdout)
    ours = dict((r[0], r[1]) for r in rows).get(f"full A={A_ref}")
    if m and ours:
      print(f"peer ratio at A={A_ref}: {ours:,.0f} / {float(m.group(1)):,.0f} = "
            f"{ours / float(m.group(1)):.2f}x")


def main(argv):
  del argv
  if _WHAT.value == "sample":
    bench_sample()
  else:
    bench_train()


if __name__ == "__main__":
  app.run(main)
