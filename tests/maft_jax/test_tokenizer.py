"""maft_jax.tokenizer: ids, decoding, special tokens and the chat template equal
transformers'; a tokenizer that does not fit the embedding or is missing is
refused."""

import os

import pytest

from maft_jax import checkpoint
from maft_jax.tokenizer import TokenizerError

from tests import hf_fixtures


def test_our_tokenizer_matches_transformers(tokenizer_dir):
  import transformers as tf

  from maft_jax.tokenizer import Tokenizer

  ours, ref = Tokenizer(tokenizer_dir), tf.AutoTokenizer.from_pretrained(tokenizer_dir)
  for text in hf_fixtures.CORPUS + ["", "  spaces  and\nnewlines"]:
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
  assert (ours.bos_id, ours.pad_id, ours.eos_ids) == (ref.bos_token_id, ref.pad_token_id, (2,))
  assert ours.eos_id == ref.eos_token_id
  messages = [{"role": "user", "content": "What is 2+2?"}]
  assert ours.apply_chat_template(messages) == ref.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=True)


def test_tokenizer_larger_than_embedding(tmp_path, tokenizer_dir):
  d = hf_fixtures.make_model("qwen2", str(tmp_path / "small"), tokenizer_dir, vocab_size=64)
  with pytest.raises(TokenizerError, match="tokenizer has .* only 64 rows"):
    checkpoint.import_hf(d, str(tmp_path / "ck"), agents=1)  # launch.import_hf's body
  assert not os.path.exists(tmp_path / "ck")


def test_no_tokenizer_json(tmp_path):
  from maft_jax.tokenizer import Tokenizer
  with pytest.raises(TokenizerError, match=f"{tmp_path}: no tokenizer.json"):
    Tokenizer(str(tmp_path))
