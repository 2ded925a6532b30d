r"""Benchmarks, measured side by side in one process on one card.

    python -m launch.bench --what=sample [--tiny] [--peer]

`--what=sample` runs the reference sampling workload: Qwen2-0.5B
architecture, random init, bf16, 64 prompts of 128 tokens per agent, 256 new
tokens (EOS disabled), T=0.8, top-p 0.95, for A = 1, 2, 4, 8 agents. It
measures the card's two ceilings in the same run (elementwise read+write
bandwidth, bf16 matmul rate) and prints, per A: generated tok/s, the fraction
of the roofline (parameter and live-KV bytes every decode step must read over
the measured bandwidth, plus prefill FLOPs over the measured matmul rate),
and the ratio of the vmapped population against the same agents sampled one
after another. `--peer` also runs ../shared/bench/hf_generate_peer.py (HF
transformers `generate`, one model per agent) in the same command and prints
our ratio against it. `--tiny` is a CPU-sized version of all of it.
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

from maft_jax import model, population, presets, sampling

_WHAT = flags.DEFINE_enum("what", "sample", ["sample"], "Which benchmark.")
_TINY = flags.DEFINE_bool("tiny", False, "CPU-sized workload.")
_PEER = flags.DEFINE_bool("peer", False, "Also run the HF peer in this command.")
_AGENTS = flags.DEFINE_list("agents", None, "Agent counts (default 1,2,4,8; tiny 1,2).")
_ARCH = flags.DEFINE_string("arch", "qwen2-0.5b", "Preset architecture.")
_BATCH = flags.DEFINE_integer("batch", None, "Prompts per agent (default 64; tiny 4).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", None, "Prompt tokens (default 128; tiny 16).")
_NEW = flags.DEFINE_integer("new_tokens", None, "New tokens (default 256; tiny 16).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median).")
_PEER_SCRIPT = flags.DEFINE_string(
    "peer_script", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench",
                                "hf_generate_peer.py"), "The HF generate peer.")

TINY_CFG = model.ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4,
                             num_heads=4, num_kv_heads=2, head_dim=16, dtype="bfloat16",
                             param_dtype="bfloat16")


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


def roofline_seconds(cfg, num_params: int, A: int, B: int, T: int, N: int, bw: float,
                     flops: float) -> float:
  """Floor: every decode step reads all agents' weights and the live KV cache;
  prefill does 2 * P FLOPs per prompt token."""
  param_bytes = num_params * jnp.dtype(cfg.param_dtype).itemsize
  kv_tokens = A * B * (N * T + N * (N - 1) / 2)  # live cache summed over the N steps
  decode = (N * A * param_bytes + kv_tokens * kv_bytes_per_token(cfg)) / bw
  prefill = 2 * num_params * A * B * T / flops
  return decode + prefill


def run_peer(arch: str, A: int, B: int, T: int, N: int) -> float | None:
  script = os.path.abspath(_PEER_SCRIPT.value)
  if not os.path.isfile(script):
    print(f"peer: {script} not found", flush=True)
    return None
  cmd = [sys.executable, script, "--arch", arch, "--agents", str(A), "--batch", str(B),
         "--prompt_len", str(T), "--new_tokens", str(N), "--cache", "dynamic"]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  print(proc.stdout.strip() or proc.stderr.strip()[-2000:], flush=True)
  m = re.search(r"([\d.]+) tok/s", proc.stdout)
  return float(m.group(1)) if m else None


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
  for A in agents:
    pop = population.init(cfg, jax.random.key(1), A)
    run = lambda p=pop: sampling.sample(p, prompts, mask, jax.random.key(2), **kw).tokens  # noqa
    t_pop = median_time(run, repeats)
    # The same agents one after another (each its own 1-agent program call).
    singles = [population.stack([population.select(pop, i)]) for i in range(A)]
    t_seq = median_time(lambda: [sampling.sample(s, prompts, mask, jax.random.key(2), **kw).tokens
                                 for s in singles], repeats)
    floor = roofline_seconds(cfg, num_params, A, B, T, N, bw, flops)
    rows.append((A, A * B * N / t_pop, floor / t_pop, t_seq / t_pop, t_pop))
    del pop, singles
  print(f"\nsampling: {'tiny' if tiny else _ARCH.value} ({num_params / 1e6:.1f}M params/agent), "
        f"{B} prompts x {T} tokens per agent, {N} new tokens, T=0.8 top-p 0.95, bf16")
  print(f"{'agents':>6} {'tok/s':>12} {'roofline':>9} {'vs sequential':>14} {'seconds':>8}")
  for A, tps, frac, ratio, t in rows:
    print(f"{A:>6} {tps:>12,.0f} {frac:>8.1%} {ratio:>13.2f}x {t:>8.3f}")
  if _PEER.value:
    A_ref = 4 if 4 in agents else agents[-1]
    peer = run_peer(_ARCH.value, A_ref, B, T, N)
    ours = dict((r[0], r[1]) for r in rows)[A_ref]
    if peer:
      print(f"peer ratio at A={A_ref}: {ours:,.0f} / {peer:,.0f} = {ours / peer:.1f}x")


def main(argv):
  del argv
  if _WHAT.value == "sample":
    bench_sample()


if __name__ == "__main__":
  app.run(main)
