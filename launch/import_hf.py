r"""Import a local Hugging Face model as a population checkpoint.

    python -m launch.import_hf --hf_dir=DIR --out=CKPT --agents=N

Reads config.json, model.safetensors (or sharded safetensors with
model.safetensors.index.json) and the tokenizer files, and writes an orbax
checkpoint of N identical agents plus the tokenizer and model config.
Pickled .bin/.pt weights are refused.
"""

from absl import app, flags

from maft_jax import checkpoint, hf, population
from maft_jax.tokenizer import Tokenizer, check_fits

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Local HF model directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Checkpoint directory to write.", required=True)
_AGENTS = flags.DEFINE_integer("agents", 1, "Number of agents (copies of the base).", lower_bound=1)
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                                 "Storage dtype of the parameters.")


def main(argv):
  del argv
  tok = Tokenizer(_HF_DIR.value)
  m = hf.load(_HF_DIR.value, param_dtype=_PARAM_DTYPE.value)
  check_fits(tok, m.cfg.vocab_size, _HF_DIR.value)
  pop = population.replicate(m.params, _AGENTS.value)
  path = checkpoint.save_population(_OUT.value, pop, cfg=m.cfg, hf_config=m.hf_config,
                                    source_dtype=m.source_dtype, tokenizer_from=_HF_DIR.value)
  print(f"wrote {path}: {_AGENTS.value} agent(s) of {hf.architecture(m.hf_config)}, "
        f"{population.model.count_params(m.params):,} parameters each "
        f"({_PARAM_DTYPE.value}; source {m.source_dtype})")


if __name__ == "__main__":
  app.run(main)
