"""Tokenizer from a HF directory's `tokenizer.json`, without transformers.

transformers' tokenizer classes import torch whenever torch is installed, and
the library must never import torch, so we drive the `tokenizers` library (the
Rust engine behind transformers' fast tokenizers) directly: `tokenizer.json`
carries the normaliser, model and post-processor (BOS handling), and
`tokenizer_config.json` / `generation_config.json` carry the special tokens
and the chat template, rendered with jinja2 the way transformers does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import tokenizers


class TokenizerError(ValueError):
  pass


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path}: not valid JSON: {e}") from None


def _token_str(tok) -> str | None:
  if isinstance(tok, dict):  # AddedToken serialised as a dict
    return tok.get("content")
  return tok


class Tokenizer:
  """Encode/decode, special ids and chat template of one HF tokenizer dir."""

  def __init__(self, path: str):
    self.path = path
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
      raise TokenizerError(
          f"{path}: no tokenizer.json. maft_jax reads fast-tokenizer files only; create one "
          "with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    try:
      self._tok = tokenizers.Tokenizer.from_file(tj)
    except Exception as e:  # the Rust error type is not exported
      raise TokenizerError(f"{tj}: cannot be read by the tokenizers library: {e}") from None
    self.config = _read_json(os.path.join(path, "tokenizer_config.json"))
    special = _read_json(os.path.join(path, "special_tokens_map.json"))
    gen = _read_json(os.path.join(path, "generation_config.json"))

    def special_id(name):
      tok = _token_str(self.config.get(name)) or _token_str(special.get(name))
      return None if tok is None else self._tok.token_to_id(tok)

    self.bos_id = special_id("bos_token")
    self.pad_id = special_id("pad_token")
    eos = {special_id("eos_token")}
    # The token that ends a turn in this tokenizer's own format (appended to
    # training completions); eos_ids holds every id that stops sampling.
    self.eos_id = special_id("eos_token")
    gen_eos = gen.get("eos_token_id")
    eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    self.eos_ids = tuple(sorted(i for i in eos if i is not None))
    if self.eos_id is None and self.eos_ids:
      self.eos_id = self.eos_ids[0]
    if self.pad_id is None and isinstance(gen.get("pad_token_id"), int):
      self.pad_id = gen["pad_token_id"]

    template = self.config.get("chat_template")
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
      with open(jinja_path) as f:
        template = f.read()
    if isinstance(template, list):  # named templates: take "default"
      template = {t["name"]: t["template"] for t in template}.get("default")
    self.chat_template: str | None = template

  @property
  def vocab_size(self) -> int:
    """Ids the tokenizer can emit, added tokens included."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages: Sequence[dict[str, str]], *,
                          add_generation_prompt: bool = True) -> str:
    """Render messages as text; its special tokens are in the text, so encode
    it with add_special_tokens=False (as transformers does)."""
    if not self.chat_template:
      raise TokenizerError(f"{self.path}: the tokenizer has no chat template")
    import jinja2.sandbox  # only chat users need it

    def raise_exception(message):
      raise TokenizerError(f"{self.path}: chat template error: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    special = {k: _token_str(self.config.get(k)) for k in
               ("bos_token", "eos_token", "pad_token", "unk_token")}
    return env.from_string(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        **{k: v for k, v in special.items() if v is not None})


def check_fits(tokenizer: Tokenizer, vocab_size: int, where: str):
  """The model must have an embedding row for every id the tokenizer emits."""
  if tokenizer.vocab_size > vocab_size:
    raise TokenizerError(
        f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding "
        f"has only {vocab_size} rows (config.json vocab_size); ids >= {vocab_size} would index "
        "past the embedding. Use the tokenizer that belongs to this model.")
