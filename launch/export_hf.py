r"""Export agents of a population checkpoint as Hugging Face directories.

    python -m launch.export_hf --checkpoint=CKPT --agent=I|all --out=DIR [--format=peft]

`--agent=all` writes DIR/agent_0, DIR/agent_1, ...; each directory loads with
transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained. Weights are
written in the dtype the model was imported from unless --dtype says otherwise.
A LoRA checkpoint's agents are its adapters merged into the base. With
--format=peft a LoRA checkpoint is written as DIR/base (the base, a HF
directory) and each agent's adapters in the PEFT format over it (DIR/agent_I,
or DIR/adapter for one agent), which peft.PeftModel.from_pretrained loads.
"""

from absl import app, flags

from maft_jax import checkpoint, hf

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Population checkpoint.", required=True)
_AGENT = flags.DEFINE_string("agent", "all", "Agent index, or 'all'.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", None, list(hf.DTYPES), "Weight dtype (default: the source's).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Shard safetensors above this size.")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "peft"],
                            "hf: full models (LoRA agents merged); peft: a LoRA checkpoint's "
                            "base and per-agent PEFT adapters.")


def main(argv):
  del argv
  if _AGENT.value == "all":
    agents = None
  else:
    try:
      agents = [int(_AGENT.value)]
    except ValueError:
      raise app.UsageError(f"--agent={_AGENT.value!r}: an index or 'all'") from None
  try:
    export = checkpoint.export_peft if _FORMAT.value == "peft" else checkpoint.export_hf
    dirs = export(_CHECKPOINT.value, _OUT.value, agents=agents, dtype=_DTYPE.value,
                  max_shard_bytes=int(_MAX_SHARD_GB.value * 2**30))
  except (checkpoint.CheckpointError, hf.HFError) as e:
    raise app.UsageError(str(e)) from None  # names the checkpoint, or the agent out of range
  for out in dirs:
    print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
