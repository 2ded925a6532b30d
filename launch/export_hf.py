r"""Export agents of a population checkpoint as Hugging Face directories.

    python -m launch.export_hf --checkpoint=CKPT --agent=I|all --out=DIR

`--agent=all` writes DIR/agent_0, DIR/agent_1, ...; each directory loads with
transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained. Weights are
written in the dtype the model was imported from unless --dtype says otherwise.
"""

import os

import jax
from absl import app, flags

from maft_jax import checkpoint, hf, population

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Population checkpoint.", required=True)
_AGENT = flags.DEFINE_string("agent", "all", "Agent index, or 'all'.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, list(hf.DTYPES), "Weight dtype (default: the source's).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Shard safetensors above this size.")


def main(argv):
  del argv
  meta = checkpoint.read_meta(_CHECKPOINT.value)
  if _AGENT.value == "all":
    agents = list(range(meta.num_agents))
  else:
    try:
      agents = [int(_AGENT.value)]
    except ValueError:
      raise app.UsageError(f"--agent={_AGENT.value!r}: an index or 'all'") from None
    if not 0 <= agents[0] < meta.num_agents:
      raise app.UsageError(f"--agent={agents[0]}: the checkpoint has agents 0..{meta.num_agents - 1}")
  pop, meta = checkpoint.load_population(_CHECKPOINT.value)
  dtype = _DTYPE.value or meta.source_dtype
  for i in agents:
    out = _OUT.value if _AGENT.value != "all" else os.path.join(_OUT.value, f"agent_{i}")
    params = jax.device_get(population.select(pop, i))
    hf.save(out, params, meta.cfg, meta.hf_config, dtype=dtype,
            tokenizer_dir=checkpoint.tokenizer_dir(_CHECKPOINT.value),
            max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30))
    print(f"wrote {out} (agent {i}, {dtype})")


if __name__ == "__main__":
  app.run(main)
