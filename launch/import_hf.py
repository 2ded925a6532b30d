r"""Import a local Hugging Face model as a population checkpoint.

    python -m launch.import_hf --hf_dir=DIR --out=CKPT --agents=N

Reads config.json, model.safetensors (or sharded safetensors with
model.safetensors.index.json) and the tokenizer files, and writes an orbax
checkpoint of N identical agents plus the tokenizer and model config.
Pickled .bin/.pt weights are refused.
"""

from absl import app, flags

from maft_jax import checkpoint, hf, model

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Local HF model directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Checkpoint directory to write.", required=True)
_AGENTS = flags.DEFINE_integer("agents", 1, "Number of agents (copies of the base).", lower_bound=1)
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Storage dtype of the parameters.")


def main(argv):
  del argv
  path = checkpoint.import_hf(_HF_DIR.value, _OUT.value, agents=_AGENTS.value,
                              param_dtype=_PARAM_DTYPE.value)
  meta = checkpoint.read_meta(path)
  params = model.count_params(model.param_shapes(meta.cfg))
  print(f"wrote {path}: {meta.num_agents} agent(s) of {hf.architecture(meta.hf_config)}, "
        f"{params:,} parameters each ({_PARAM_DTYPE.value}; source {meta.source_dtype})")


if __name__ == "__main__":
  app.run(main)
