"""maft_jax.data (sft_batches): order, sharding, padding, packing and resumable state."""

import collections
import itertools
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from maft_jax import data

from tests import cli


ROOT = cli.ROOT
KEYS = ("tokens_BxT", "loss_mask_BxT", "segment_ids_BxT", "positions_BxT")


def _examples(n, seed=0):
  """SFT examples whose tokens are unique: example i's tokens are 1000 * (i + 1) + j."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p, c = int(rng.integers(0, 7)), int(rng.integers(1, 6))
    out.append({"prompt_ids": [1000 * (i + 1) + j for j in range(p)],
                "completion_ids": [1000 * (i + 1) + 500 + j for j in range(c)]})
  return out


def _sft(examples, **kw):
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  kw.setdefault("seed", 0)
  kw.setdefault("pad_id", 0)
  kw.setdefault("seq_len", 16)
  return data.sft_batches(examples, **kw)


def _segments(batch):
  """[(tokens, loss_mask)] per segment, checking the row layout as it goes."""
  segs = []
  tok, loss, seg, pos = (batch[k] for k in KEYS)
  for r in range(tok.shape[0]):
    ids = seg[r]
    used = int((ids > 0).sum())
    assert (ids[used:] == 0).all(), f"padding inside row {r}: {ids}"
    assert (loss[r, used:] == 0).all() and (pos[r, used:] == 0).all()
    start = 0
    for s in range(1, int(ids.max(initial=0)) + 1):
      where = np.flatnonzero(ids == s)
      assert where.size and where[0] == start, f"segment {s} of row {r} not contiguous"
      assert (np.diff(where) == 1).all()
      assert pos[r, where].tolist() == list(range(where.size)), "positions must restart"
      segs.append((tuple(tok[r, where].tolist()), tuple(loss[r, where].tolist())))
      start = where[-1] + 1
    assert start == used
  return segs


def _ids(batch):
  """The indices of the `_examples` in a batch, in row and segment order."""
  return [toks[0] // 1000 - 1 for toks, _ in _segments(batch)]


def _with_epochs(it, k=None):
  """[(epoch, batch)] of the next k batches (all when None); the epoch of a
  batch is the iterator state's epoch right after it was taken."""
  return [(it.get_state()["epoch"], b) for b in itertools.islice(it, k)]


def _epoch_ids(it, num_epochs):
  """Per epoch, the flat list of example indices."""
  out = collections.defaultdict(list)
  for e, b in _with_epochs(it):
    out[e].extend(_ids(b))
  assert set(out) <= set(range(num_epochs))
  return [out[e] for e in range(num_epochs)]


def _assert_same_batches(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == set(w) == set(KEYS)
    for key in KEYS:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def _same_batches(a, b):
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


def _expected_segments(examples, seq_len):
  out = []
  for ex in examples:
    p, c = list(ex["prompt_ids"]), list(ex["completion_ids"])
    p = p[max(0, len(p) + len(c) - seq_len):]
    out.append((tuple(p + c), (0,) * len(p) + (1,) * len(c)))
  return out


# ---------------------------------------------------------------- order


@pytest.mark.parametrize("pack", [True, False])
def test_same_seed_same_batches_other_seed_differs(pack):
  examples = _examples(50)
  kw = dict(batch_size=4, pack=pack, num_epochs=2)
  a = list(_sft(examples, seed=3, **kw))
  b = list(_sft(examples, seed=3, **kw))
  c = list(_sft(examples, seed=4, **kw))
  _assert_same_batches(a, b)
  assert not _same_batches(a, c), "another seed must give other batches"
  assert sorted(sum(map(_ids, a), [])) == sorted(list(range(50)) * 2)
  assert sum(map(_ids, a), []) != list(range(50)) * 2, "not shuffled"


def test_each_epoch_is_a_different_permutation():
  epochs = _epoch_ids(_sft(_examples(40), batch_size=8, pack=False, num_epochs=4), 4)
  for e in epochs:
    assert sorted(e) == list(range(40))
  assert len({tuple(e) for e in epochs}) == 4
  # seeds are hashed with the epoch: seed s epoch e+1 is not seed s+1 epoch e
  shifted = _epoch_ids(_sft(_examples(40), batch_size=8, pack=False, seed=1), 1)[0]
  assert shifted != epochs[1]


@pytest.mark.parametrize("pack", [True, False])
def test_no_shuffle_keeps_input_order(pack):
  epochs = _epoch_ids(_sft(_examples(10), batch_size=4, pack=pack, epoch_shuffle=False,
                           num_epochs=2), 2)
  if pack:  # first-fit packing may place a later example in an earlier row
    assert epochs[0] == epochs[1] and sorted(epochs[0]) == list(range(10))
  else:
    assert epochs == [list(range(10))] * 2


def test_infinite_epochs():
  it = _sft(_examples(6), batch_size=4, pack=False, num_epochs=None)
  assert it.num_batches() is None
  got = _with_epochs(it, 11)
  assert [e for e, _ in got] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
  for e in range(5):
    assert sorted(_ids(got[2 * e][1]) + _ids(got[2 * e + 1][1])) == list(range(6))


def test_threaded_reads_give_the_same_batches():
  examples = _examples(37)
  kw = dict(batch_size=3, seed=2, num_epochs=2, shard_index=1, shard_count=2)
  plain = list(_sft(examples, **kw))
  threaded = list(_sft(examples, read_options=grain.ReadOptions(
      num_threads=2, prefetch_buffer_size=4), **kw))
  assert len(plain) > 3
  _assert_same_batches(threaded, plain)


# ---------------------------------------------------------------- rows


@pytest.mark.parametrize("pack", [True, False])
def test_every_example_once_per_epoch_with_fixed_shapes(pack):
  examples = _examples(40)
  batches = list(_sft(examples, batch_size=4, pack=pack, num_epochs=2))
  for b in batches:
    assert set(b) == set(KEYS)
    for v in b.values():
      assert v.shape == (4, 16) and v.dtype == np.int32
  segs = [s for b in batches for s in _segments(b)]
  want = _expected_segments(examples, 16)
  assert collections.Counter(segs) == collections.Counter(want * 2), \
      "each epoch must hold every example exactly once, loss on completions only"
  rows_used = sum(int((b["segment_ids_BxT"] > 0).any(axis=1).sum()) for b in batches)
  if pack:
    assert rows_used < len(examples) * 2, "packing should share rows"
    assert any(b["segment_ids_BxT"].max() > 1 for b in batches)
  else:
    assert rows_used == len(examples) * 2
    assert all(b["segment_ids_BxT"].max() <= 1 for b in batches), "one example per row"


def test_padding_and_pad_id():
  examples = [{"prompt_ids": [5, 6], "completion_ids": [7]}]
  (b,) = list(_sft(examples, batch_size=2, seq_len=6, pad_id=99))
  assert b["tokens_BxT"].tolist() == [[5, 6, 7, 99, 99, 99], [99] * 6]
  assert b["loss_mask_BxT"].tolist() == [[0, 0, 1, 0, 0, 0], [0] * 6]
  assert b["segment_ids_BxT"].tolist() == [[1, 1, 1, 0, 0, 0], [0] * 6]
  assert b["positions_BxT"].tolist() == [[0, 1, 2, 0, 0, 0], [0] * 6]


def test_padded_last_batch_and_drop_remainder():
  examples = _examples(10)
  batches = list(_sft(examples, batch_size=4, pack=False, pad_id=99))
  used = [(b["segment_ids_BxT"] > 0).any(axis=1).tolist() for b in batches]
  assert used == [[True] * 4, [True] * 4, [True, True, False, False]]
  last = batches[-1]
  assert (last["tokens_BxT"][2:] == 99).all() and (last["loss_mask_BxT"][2:] == 0).all()
  assert (last["segment_ids_BxT"][2:] == 0).all() and (last["positions_BxT"][2:] == 0).all()
  dropped = list(_sft(examples, batch_size=4, pack=False, pad_id=99, drop_remainder=True))
  _assert_same_batches(dropped, batches[:2])
  # the remainder is of the global batch: shard 1 of 2 (global batch 4) also stops after 2
  shard = list(_sft(examples, batch_size=2, pack=False, pad_id=99, drop_remainder=True,
                    shard_index=1, shard_count=2))
  _assert_same_batches(shard, [{k: b[k][2:] for k in KEYS} for b in batches[:2]])
  # packed: the rows per epoch vary, but no dropped-remainder batch holds an empty row
  packed = list(_sft(_examples(40), batch_size=3, drop_remainder=True, num_epochs=3))
  assert packed and all((b["segment_ids_BxT"] > 0).any(axis=1).all() for b in packed)


def test_packing_layout():
  examples = [{"prompt_ids": [1, 2], "completion_ids": [3]},     # 3 tokens
              {"prompt_ids": [4], "completion_ids": [5, 6, 7]},  # 4 tokens
              {"prompt_ids": [], "completion_ids": [8, 9]}]      # 2 tokens
  (b,) = list(_sft(examples, batch_size=2, seq_len=8, epoch_shuffle=False))
  assert b["tokens_BxT"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 0]
  assert b["segment_ids_BxT"][0].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
  assert b["positions_BxT"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
  assert b["loss_mask_BxT"][0].tolist() == [0, 0, 1, 0, 1, 1, 1, 0]
  assert b["tokens_BxT"][1].tolist() == [8, 9, 0, 0, 0, 0, 0, 0]
  assert b["loss_mask_BxT"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]


def test_overlong_examples():
  long = [{"prompt_ids": list(range(10, 20)), "completion_ids": [1, 2, 3]}]
  (b,) = list(_sft(long, batch_size=1, seq_len=5))
  assert b["tokens_BxT"][0].tolist() == [18, 19, 1, 2, 3], "prompt cut from the left"
  assert b["loss_mask_BxT"][0].tolist() == [0, 0, 1, 1, 1]
  with pytest.raises(data.DataError, match="example 0.*overlong='error'"):
    _sft(long, batch_size=1, seq_len=5, overlong="error")
  too_long = _examples(3) + [{"prompt_ids": [1], "completion_ids": [2] * 5}]
  with pytest.raises(data.DataError, match="example 3: completion of 5 tokens"):
    _sft(too_long, batch_size=1, seq_len=5)


@pytest.mark.parametrize("bad,match", [
    ({"prompt_ids": [1]}, "example 1: expected a dict"),
    ({"prompt_ids": [1], "completion_ids": []}, "example 1: completion_ids is empty"),
    ({"prompt_ids": [1.5], "completion_ids": [2]}, "example 1: prompt_ids"),
    ({"prompt_ids": [1], "completion_ids": [-3]}, "example 1: completion_ids holds token id -3"),
])
def test_bad_examples_name_the_example(bad, match):
  with pytest.raises(data.DataError, match=match):
    _sft([{"prompt_ids": [1], "completion_ids": [2]}, bad], batch_size=1, seq_len=8)


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("n,shards,batch", [(37, 3, 2), (24, 4, 3), (5, 8, 2), (1, 2, 1)])
def test_shards_disjoint_covering_and_equal_length(n, shards, batch, pack):
  examples = _examples(n, seed=1)
  per_shard = [_with_epochs(_sft(examples, batch_size=batch, pack=pack, seed=4, num_epochs=2,
                                 shard_index=k, shard_count=shards)) for k in range(shards)]
  assert len({len(bs) for bs in per_shard}) == 1, "shards must yield equal batch counts"
  for epoch in range(2):
    segs = [s for bs in per_shard for e, b in bs if e == epoch for s in _segments(b)]
    assert collections.Counter(segs) == collections.Counter(_expected_segments(examples, 16)), \
        f"epoch {epoch}: not every example exactly once"
  for bs in per_shard:
    for _, b in bs:
      assert all(v.shape == (batch, 16) for v in b.values())


def test_shards_draw_different_examples_each_epoch():
  it = _sft(_examples(30), batch_size=5, pack=False, num_epochs=2, shard_index=0,
            shard_count=3)
  e0, e1 = _epoch_ids(it, 2)
  assert len(e0) == len(e1) == 10
  assert set(e0) != set(e1), "shard 0 should not be stuck with a fixed subset"


def test_default_shard_is_the_jax_process():
  examples = _examples(9)
  got = list(data.sft_batches(examples, batch_size=4, seq_len=16, seed=1, pad_id=0))
  want = list(_sft(examples, batch_size=4, seed=1, shard_index=0, shard_count=1))
  _assert_same_batches(got, want)


@pytest.mark.parametrize("cuts", [(0, 3, 5, 8), (0, 8), (0, 1, 2, 3, 4, 5, 6, 7, 8), (0, 0, 6, 8)])
def test_slot_ranges_concatenate_to_the_whole_batch(cuts):
  """How many processes share a stream changes no batch: the slot ranges of
  any partition of the global batch, side by side, are the one-range batches
  (also the last, padded one, and across epochs)."""
  examples = _examples(45, seed=3)
  kw = dict(batch_size=8, seed=5, num_epochs=2, shard_index=None, shard_count=None)
  whole = list(_sft(examples, slots=(0, 8), **kw))
  parts = [list(_sft(examples, slots=(lo, hi), **kw)) for lo, hi in zip(cuts, cuts[1:])]
  assert len(whole) > 2 and all(len(p) == len(whole) for p in parts)
  for b, want in enumerate(whole):
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[b][key] for p in parts]), want[key])
  # shard k of S with batch b is slots k*b .. (k+1)*b of the global batch S*b
  shard = list(_sft(examples, batch_size=4, seed=5, num_epochs=2, shard_index=1, shard_count=2))
  assert len(shard) == len(whole)
  for got, want in zip(shard, whole):
    np.testing.assert_array_equal(got["tokens_BxT"], want["tokens_BxT"][4:])


@pytest.mark.parametrize("slots,kw,match", [
    ((0, 9), {}, r"slots=\(0, 9\): expected \(lo, hi\) with 0 <= lo <= hi <= batch_size=8"),
    ((3, 2), {}, "slots=.3, 2."),
    ((0, 4), {"shard_index": 0, "shard_count": 2}, "give slots or a shard, not both"),
])
def test_bad_slots_are_refused(slots, kw, match):
  kw = {"shard_index": None, "shard_count": None, **kw}
  with pytest.raises(data.DataError, match=match):
    _sft(_examples(4), batch_size=8, slots=slots, **kw)


# ---------------------------------------------------------------- state


def _resume_check(build, k, rest=None):
  """Takes k batches, then the state (through JSON, as a train checkpoint
  stores it); a rebuilt pipeline restored from it yields exactly the batches
  that the uninterrupted one goes on to yield (the next `rest`, or all)."""
  it = build()
  list(itertools.islice(it, k))
  state = json.loads(json.dumps(it.get_state()))
  restored = build()
  restored.set_state(state)
  got, want = _with_epochs(restored, rest), _with_epochs(it, rest)
  assert len(got) == len(want) > 0
  assert [e for e, _ in got] == [e for e, _ in want]
  _assert_same_batches([b for _, b in got], [b for _, b in want])
  return state, got


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7])  # 2 batches per epoch: 2 and 4 are boundaries
def test_resume_gives_the_next_batches(k):
  examples = _examples(8, seed=2)

  def build():  # shard 1 of 2 holds 4 of the 8 examples of an epoch: 2 batches
    return _sft(examples, batch_size=2, pack=False, seed=5, num_epochs=None, shard_index=1,
                shard_count=2)
  _, got = _resume_check(build, k, rest=5)
  assert [e for e, _ in got] == [(k + j) // 2 for j in range(5)]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_packed_resume_gives_the_rest_of_the_run(k):
  examples = _examples(12, seed=2)
  _resume_check(lambda: _sft(examples, batch_size=2, seed=9, num_epochs=3), k)


def test_resume_across_an_epoch_boundary():
  examples = _examples(12, seed=2)

  def build(num_epochs=3):
    return _sft(examples, batch_size=2, seed=9, num_epochs=num_epochs)
  epoch_len = len(list(build(num_epochs=1)))
  assert epoch_len >= 2
  # saved right after the epoch's last batch: the next one opens epoch 1
  state, got = _resume_check(build, epoch_len)
  assert state["epoch"] == 0 and state["grain"] is not None, "saved at the epoch's end"
  assert got[0][0] == 1


def test_state_is_json_and_finished_state_stays_finished():
  examples = _examples(5)
  it = _sft(examples, batch_size=2, pack=False, num_epochs=1)
  list(it)
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state
  again = _sft(examples, batch_size=2, pack=False, num_epochs=1)
  again.set_state(state)
  assert list(again) == []
  # more epochs may be asked for after the fact: training resumes at epoch 1
  longer = _sft(examples, batch_size=2, pack=False, num_epochs=2)
  longer.set_state(state)
  got = _with_epochs(longer)
  assert [e for e, _ in got] == [1, 1, 1]
  whole = _with_epochs(_sft(examples, batch_size=2, pack=False, num_epochs=2))
  _assert_same_batches([b for _, b in got], [b for e, b in whole if e == 1])


def test_state_of_one_slot_range_resumes_another():
  """A resumed run may have another process count: the state is a position in
  the global stream, so any slot range resumes at the same global batch."""
  examples = _examples(30, seed=4)
  kw = dict(batch_size=6, seed=2, num_epochs=2, shard_index=None, shard_count=None)
  it = _sft(examples, slots=(0, 2), **kw)
  for _ in range(4):
    next(it)
  other = _sft(examples, slots=(2, 6), **kw)
  other.set_state(it.get_state())
  rest = list(other)
  want = list(_sft(examples, slots=(2, 6), **kw))[4:]
  assert len(want) > 0
  _assert_same_batches(rest, want)
  assert it.num_batches() == other.num_batches() == len(list(_sft(examples, slots=(0, 6), **kw)))


def test_state_from_another_stream_is_refused():
  examples = _examples(10)
  kw = dict(batch_size=4, seed=1)
  it = _sft(examples, **kw)
  next(it)
  state = it.get_state()
  cases = [
      (dict(kw, seed=2), examples, "saved by a pipeline with seed=1; this pipeline has seed=2"),
      (dict(kw, shard_index=1, shard_count=2), examples,
       "global_batch_size=4; this pipeline has global_batch_size=8"),
      (kw, _examples(11)[1:], "examples_digest"),
      (dict(kw, seq_len=32), examples, "seq_len=16"),
      (dict(kw, pad_id=7), examples, "pad_id=0"),
      (dict(kw, pack=False), examples, "pack=True"),
      (dict(kw, drop_remainder=True), examples, "drop_remainder=False"),
  ]
  for other_kw, other_examples, match in cases:
    with pytest.raises(data.DataError, match=match):
      _sft(other_examples, **other_kw).set_state(state)
  same = _sft(examples, **kw)
  for field, value, match in [("format", "something.else", "format 'something.else'"),
                              ("version", 1, "version 1"),
                              ("epoch", 5, "epoch=5 is outside"),
                              ("grain", {"next_index": 99}, "does not fit this pipeline")]:
    with pytest.raises(data.DataError, match=match):
      same.set_state(dict(state, **{field: value}))
  with pytest.raises(data.DataError, match="kind='another_pipeline'"):
    same.set_state(dict(state, pipeline=dict(state["pipeline"], kind="another_pipeline")))
  same.set_state(state)  # still accepts the real one
  _assert_same_batches(list(same), list(it))


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(shard_index=2, shard_count=2), "shard_index=2 must be < shard_count=2"),
    (dict(shard_index=0, shard_count=None), "give both or neither"),
    (dict(num_epochs=0), "num_epochs=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(seq_len=0), "seq_len=0"),
    (dict(pack_window=0), "pack_window=0"),
    (dict(pad_id=2**31), "pad_id=2147483648"),
    (dict(overlong="keep"), "overlong='keep'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
  with pytest.raises(data.DataError, match=match):
    _sft(_examples(10), **dict(dict(batch_size=4), **kwargs))


def test_empty_and_too_small_inputs_are_refused():
  with pytest.raises(data.DataError, match="empty"):
    _sft([], batch_size=1)
  # with drop_remainder an epoch must hold one full global batch (checked per epoch)
  it = _sft(_examples(10), batch_size=20, pack=False, drop_remainder=True)
  with pytest.raises(data.DataError, match="epoch 0: drop_remainder with 10 rows leaves no "
                     "full global batch of 20"):
    next(it)


# ---------------------------------------------------------------- processes


_CHILD = """
import json
from maft_jax import data
from tests import cli
examples = [{"prompt_ids": [i] * (i % 5), "completion_ids": [i + 100] * (1 + i % 3)}
            for i in range(20)]
sft = data.sft_batches(examples, batch_size=2, seq_len=8, seed=11, pad_id=0, num_epochs=2,
                       shard_index=1, shard_count=2)
print(json.dumps([b["tokens_BxT"].tolist() for b in sft]))
"""


def test_order_is_the_same_in_another_process():
  env = dict(os.environ, PYTHONHASHSEED="12345")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120, check=True)
  child = json.loads(out.stdout.strip().splitlines()[-1])
  examples = [{"prompt_ids": [i] * (i % 5), "completion_ids": [i + 100] * (1 + i % 3)}
              for i in range(20)]
  mine = data.sft_batches(examples, batch_size=2, seq_len=8, seed=11, pad_id=0, num_epochs=2,
                          shard_index=1, shard_count=2)
  assert child == [b["tokens_BxT"].tolist() for b in mine]
