"""Host-side generation: chunking/bucketing invariance, stop strings, per-agent prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maft_jax import generation, model, population, sampling
from maft_jax.tokenizer import Tokenizer
from tests import hf_fixtures

CFG = model.ModelConfig(vocab_size=hf_fixtures.VOCAB, hidden_size=32, intermediate_size=48,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
KEY = jax.random.key(0)
PROMPTS = ["The quick brown fox", "Alice", "What is 12 + 7 * 3? Let's think step by step.",
           "apples"]


@pytest.fixture(scope="module")
def setup(tokenizer_dir):
  # Large init: logits far apart, so greedy choices are not float-noise ties.
  pop = population.stack([model.init_params(CFG, jax.random.key(i), init_std=0.5)
                          for i in range(2)])
  return pop, Tokenizer(tokenizer_dir)


def _assert_same(runs_a, runs_b):
  """Same tokens, text and finish; log-probs equal up to float reassociation."""
  flat_a = [c for prompt in runs_a for c in prompt]
  flat_b = [c for prompt in runs_b for c in prompt]
  assert [(c.token_ids, c.text, c.finish) for c in flat_a] == \
      [(c.token_ids, c.text, c.finish) for c in flat_b]
  assert [c.logprob for c in flat_a] == pytest.approx([c.logprob for c in flat_b], abs=1e-4)


def test_results_do_not_depend_on_batching(setup):
  pop, tok = setup
  method = sampling.Chain((sampling.Temperature(1.0), sampling.TopK(50)))
  buckets = {generation.bucket_length(len(ids), 16) for ids in tok.encode_batch(PROMPTS)}
  runs = []
  for batch_size in (1, 8):
    shapes = []
    gen = generation.Generator(CFG, tok, progress=False, log=shapes.append)
    opts = generation.Options(max_new_tokens=6, method=method, num_samples=2,
                              batch_size=batch_size)
    runs.append(gen.generate(pop, PROMPTS, options=opts, key=jax.random.key(1)))
    # One compiled shape per (batch, bucket) met; one chunk when everything fits.
    assert len(shapes) == len(gen.shapes) == (len(buckets) if batch_size == 1 else 1)
  for a in range(2):
    _assert_same(runs[0][a], runs[1][a])
  out = runs[0]
  assert len(out) == 2 and len(out[0]) == len(PROMPTS) and len(out[0][0]) == 2
  assert out[0][0][0] != out[0][0][1]           # two samples differ
  assert out[0][0][0].token_ids != out[1][0][0].token_ids  # agents differ
  for c in out[0][0]:
    assert c.finish in ("stop", "length") and c.text == tok.decode(c.token_ids)


def test_per_agent_prompts(setup):
  pop, tok = setup
  gen = generation.Generator(CFG, tok, progress=False)
  opts = generation.Options(max_new_tokens=5)
  mine = gen.generate(pop, [PROMPTS[:2], PROMPTS[2:]], options=opts, key=KEY)
  shared0 = gen.generate(pop, PROMPTS[:2], options=opts, key=KEY)
  shared1 = gen.generate(pop, PROMPTS[2:], options=opts, key=KEY)
  _assert_same(mine[0], shared0[0])
  _assert_same(mine[1], shared1[1])
  with pytest.raises(ValueError, match="3 prompt lists for a population of 2"):
    gen.generate(pop, [PROMPTS[:1]] * 3, options=opts, key=KEY)
  assert gen.generate(pop, [], options=opts, key=KEY) == [[], []]


def test_f32_masters_sample_as_their_compute_dtype_copy(setup):
  # Decode reads one bf16 copy of f32 masters (sampling.decode_weights); the
  # forward casts on use, so sampling a bf16 population gives the same tokens.
  pop, tok = setup
  cfg = model.ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16"})
  copy = model.for_compute(pop, cfg)
  assert copy["layers"]["wq"].dtype == jnp.bfloat16 and copy["embed"].dtype == jnp.bfloat16
  assert copy["final_norm"].dtype == jnp.float32
  tokens, mask = sampling.left_pad(tok.encode_batch(PROMPTS), pad_id=0)
  kw = dict(cfg=cfg, method=sampling.Temperature(1.0), max_new_tokens=6, pad_id=0)
  direct = sampling.sample(pop, tokens, mask, jax.random.key(3), **kw)
  cast = sampling.sample(copy, tokens, mask, jax.random.key(3), **kw)
  np.testing.assert_array_equal(direct.tokens, cast.tokens)
  np.testing.assert_array_equal(direct.logprobs, cast.logprobs)


def test_stop_strings_cut_text_and_tokens(setup):
  pop, tok = setup
  gen = generation.Generator(CFG, tok, progress=False)
  # A random model may emit EOS at once: take the first seed whose free
  # completion runs to the length limit (same program, so reproducible).
  base = dict(max_new_tokens=12, method=sampling.Temperature(1.0))
  for seed in range(20):
    free = gen.generate(pop, PROMPTS[:1], options=generation.Options(**base),
                        key=jax.random.key(seed))[0][0][0]
    if free.finish == "length" and len(free.text) > 6:
      break
  else:
    pytest.fail("no seed gave a full-length completion")
  stop = free.text[3:5]
  cut = gen.generate(pop, PROMPTS[:1], key=jax.random.key(seed), options=generation.Options(
      **base, stop_strings=(stop,)))[0][0][0]
  at = free.text.find(stop) + len(stop)
  assert cut.finish == "stop_string" and cut.text == free.text[:at]
  assert free.token_ids[:len(cut.token_ids)] == cut.token_ids
  assert stop in tok.decode(cut.token_ids) and stop not in tok.decode(cut.token_ids[:-1])


@pytest.mark.parametrize("text,end", [
    (r"so \boxed{12} and more", len(r"so \boxed{12}")),
    (r"\boxed{\frac{1}{2}} \boxed{3}", len(r"\boxed{\frac{1}{2}}")),
    (r"\boxed{unclosed", None),
    ("nothing", None),
])
def test_first_boxed_end(text, end):
  assert generation.first_boxed_end(text) == end
  opts = generation.Options(max_new_tokens=1, stop_after_boxed=True)
  assert generation.stop_cut(text, opts) == end


def test_bucket_lengths():
  lengths = (1, 16, 17, 33, 49, 65, 97, 200, 315, 385)
  assert [generation.bucket_length(n, 16) for n in lengths] == [
      16, 16, 32, 48, 64, 96, 128, 256, 384, 512]
  # Every bucket is a multiple of the minimum and wastes at most a third of a row.
  for n in range(17, 2000):
    b = generation.bucket_length(n, 16)
    assert b % 16 == 0 and n <= b and (b - n) < b / 3 + 16
