"""maft_jax.data: order, sharding, padding, packing and resumable state."""

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
from maft_jax.tasks.base import Problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problems(n):
  return [Problem(id=f"p{i}", question=f"q{i}", reference=str(i)) for i in range(n)]


def _indices(it, k=None):
  """The valid record indices of the next k batches (all when k is None)."""
  batches = list(itertools.islice(it, k))
  return [b.indices[b.valid].tolist() for b in batches]


def _epochs(records, num_epochs, **kw):
  """Per epoch, the flat list of valid indices (shard 0 of 1 unless given)."""
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  out = collections.defaultdict(list)
  for b in data.problem_batches(records, num_epochs=num_epochs, **kw):
    out[b.epoch].extend(b.indices[b.valid].tolist())
  return [out[e] for e in range(num_epochs)]


def _examples(n, seed=0):
  """SFT examples whose tokens are unique: example i is (i, 1000 + j ...)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    p, c = int(rng.integers(0, 7)), int(rng.integers(1, 6))
    out.append({"prompt_ids": [1000 * (i + 1) + j for j in range(p)],
                "completion_ids": [1000 * (i + 1) + 500 + j for j in range(c)]})
  return out


def _segments(batch):
  """[(tokens, loss_mask)] per segment, checking the row layout as it goes."""
  segs = []
  tok, loss, seg, pos = (batch[k] for k in ("tokens_BxT", "loss_mask_BxT",
                                             "segment_ids_BxT", "positions_BxT"))
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


# ---------------------------------------------------------------- problems


def test_same_seed_same_order_other_seed_differs():
  recs = _problems(50)
  a = _indices(data.problem_batches(recs, batch_size=8, seed=3, num_epochs=2,
                                    shard_index=0, shard_count=1))
  b = _indices(data.problem_batches(recs, batch_size=8, seed=3, num_epochs=2,
                                    shard_index=0, shard_count=1))
  c = _indices(data.problem_batches(recs, batch_size=8, seed=4, num_epochs=2,
                                    shard_index=0, shard_count=1))
  assert a == b
  assert a != c
  assert sum(a, []) != list(range(50)) + list(range(50)), "not shuffled"


def test_each_epoch_is_a_different_permutation():
  epochs = _epochs(_problems(40), 4, batch_size=8, seed=0)
  for e in epochs:
    assert sorted(e) == list(range(40))
  assert len({tuple(e) for e in epochs}) == 4
  # seeds are hashed with the epoch: seed s epoch e+1 is not seed s+1 epoch e
  shifted = _epochs(_problems(40), 1, batch_size=8, seed=1)[0]
  assert shifted != epochs[1]


def test_no_shuffle_keeps_input_order():
  epochs = _epochs(_problems(10), 2, batch_size=4, seed=0, epoch_shuffle=False)
  assert epochs == [list(range(10))] * 2


@pytest.mark.parametrize("n,shards,batch", [(23, 3, 4), (24, 4, 3), (5, 8, 2), (1, 2, 1)])
def test_shards_disjoint_covering_and_equal_length(n, shards, batch):
  recs = _problems(n)
  per_shard = [list(data.problem_batches(recs, batch_size=batch, seed=7, num_epochs=2,
                                         shard_index=k, shard_count=shards))
               for k in range(shards)]
  assert len({len(bs) for bs in per_shard}) == 1, "shards must yield equal batch counts"
  for epoch in range(2):
    seen = [i for bs in per_shard for b in bs if b.epoch == epoch
            for i in b.indices[b.valid].tolist()]
    assert sorted(seen) == list(range(n)), f"epoch {epoch}: not every record exactly once"
  for bs in per_shard:
    for b in bs:
      assert len(b.records) == batch and b.valid.shape == (batch,)
      for rec, i, ok in zip(b.records, b.indices, b.valid):
        if ok:
          assert rec is recs[i]
        else:
          assert i == -1 and isinstance(rec, Problem)


def test_shards_draw_different_records_each_epoch():
  recs = _problems(30)
  e0, e1 = _epochs(recs, 2, batch_size=5, seed=0, shard_index=0, shard_count=3)
  assert set(e0) != set(e1), "shard 0 should not be stuck with a fixed subset"


def test_default_shard_is_the_jax_process():
  recs = _problems(9)
  got = _indices(data.problem_batches(recs, batch_size=4, seed=1))
  want = _indices(data.problem_batches(recs, batch_size=4, seed=1, shard_index=0,
                                       shard_count=1))
  assert got == want


def test_padded_last_batch_and_drop_remainder():
  recs = _problems(10)
  batches = list(data.problem_batches(recs, batch_size=4, seed=0, shard_index=0,
                                      shard_count=1))
  assert [b.valid.tolist() for b in batches] == [[True] * 4, [True] * 4,
                                                 [True, True, False, False]]
  last = batches[-1]
  assert last.indices.tolist()[2:] == [-1, -1]
  assert last.records[2] is last.records[0], "padding repeats a real record"
  assert last.valid.dtype == np.bool_
  dropped = list(data.problem_batches(recs, batch_size=4, seed=0, shard_index=0,
                                      shard_count=1, drop_remainder=True))
  assert len(dropped) == 2 and all(b.valid.all() for b in dropped)
  assert [b.indices.tolist() for b in dropped] == [b.indices.tolist() for b in batches[:2]]


def test_infinite_epochs():
  it = data.problem_batches(_problems(6), batch_size=4, seed=0, num_epochs=None,
                            shard_index=0, shard_count=1)
  batches = list(itertools.islice(it, 11))
  assert [b.epoch for b in batches] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
  assert it.epoch == 5


def test_threaded_reads_give_the_same_batches():
  recs = _problems(37)
  kw = dict(batch_size=4, seed=2, num_epochs=2, shard_index=1, shard_count=2)
  plain = _indices(data.problem_batches(recs, **kw))
  threaded = _indices(data.problem_batches(
      recs, read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=4), **kw))
  assert plain == threaded


# ---------------------------------------------------------------- state


def _resume_check(build, k, tmp_path):
  """Take k, save, take one; rebuild, restore, take one: the same batch."""
  it = build()
  list(itertools.islice(it, k))
  path = str(tmp_path / "state.json")
  data.save_state(path, it.get_state())
  want = next(it)
  restored = build()
  restored.set_state(data.load_state(path))
  got = next(restored)
  return want, got, it, restored


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7])   # 2 batches per epoch: 2 and 4 are boundaries
def test_problem_resume_gives_the_next_batch(k, tmp_path):
  recs = _problems(10)

  def build():
    return data.problem_batches(recs, batch_size=4, seed=5, num_epochs=None,
                                shard_index=1, shard_count=2)
  # shard 1 of 2 has 5 records: 2 batches per epoch
  want, got, it, restored = _resume_check(build, k, tmp_path)
  assert got.epoch == want.epoch == k // 2
  assert got.indices.tolist() == want.indices.tolist()
  assert got.valid.tolist() == want.valid.tolist()
  assert _indices(restored, 5) == _indices(it, 5)


def test_state_is_json_and_finished_state_stays_finished(tmp_path):
  it = data.problem_batches(_problems(5), batch_size=2, seed=0, num_epochs=1,
                            shard_index=0, shard_count=1)
  list(it)
  state = it.get_state()
  assert json.loads(json.dumps(state)) == state
  again = data.problem_batches(_problems(5), batch_size=2, seed=0, num_epochs=1,
                               shard_index=0, shard_count=1)
  again.set_state(state)
  assert list(again) == []
  # more epochs may be asked for after the fact: training resumes at epoch 1
  longer = data.problem_batches(_problems(5), batch_size=2, seed=0, num_epochs=2,
                                shard_index=0, shard_count=1)
  longer.set_state(state)
  assert [b.epoch for b in longer] == [1, 1, 1]


def test_state_from_another_pipeline_is_refused(tmp_path):
  it = data.problem_batches(_problems(10), batch_size=4, seed=1, shard_index=0,
                            shard_count=1)
  next(it)
  state = it.get_state()
  other = data.problem_batches(_problems(10), batch_size=4, seed=2, shard_index=0,
                               shard_count=1)
  with pytest.raises(data.DataError, match="seed=1"):
    other.set_state(state)
  other_shard = data.problem_batches(_problems(10), batch_size=4, seed=1, shard_index=1,
                                     shard_count=2)
  with pytest.raises(data.DataError, match="global_batch_size=4; this pipeline has "
                     "global_batch_size=8"):
    other_shard.set_state(state)
  other_data = data.problem_batches(_problems(11)[1:], batch_size=4, seed=1,
                                    shard_index=0, shard_count=1)
  with pytest.raises(data.DataError, match="records_digest"):
    other_data.set_state(state)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(data.DataError, match="bad.json"):
    data.load_state(str(bad))


def test_save_state_is_atomic_and_leaves_no_temporaries(tmp_path):
  path = tmp_path / "s.json"
  data.save_state(str(path), {"format": data.STATE_FORMAT, "x": 1})
  data.save_state(str(path), {"format": data.STATE_FORMAT, "x": 2})
  assert data.load_state(str(path))["x"] == 2
  assert os.listdir(tmp_path) == ["s.json"]
  with pytest.raises(TypeError):
    data.save_state(str(path), {"format": data.STATE_FORMAT, "x": object()})
  assert data.load_state(str(path))["x"] == 2 and os.listdir(tmp_path) == ["s.json"]


# ---------------------------------------------------------------- SFT


def _sft(examples, **kw):
  kw.setdefault("shard_index", 0)
  kw.setdefault("shard_count", 1)
  kw.setdefault("seed", 0)
  kw.setdefault("pad_id", 0)
  return data.sft_batches(examples, **kw)


def _expected_segments(examples, seq_len):
  out = []
  for ex in examples:
    p, c = list(ex["prompt_ids"]), list(ex["completion_ids"])
    p = p[max(0, len(p) + len(c) - seq_len):]
    out.append((tuple(p + c), (0,) * len(p) + (1,) * len(c)))
  return out


@pytest.mark.parametrize("pack", [True, False])
def test_sft_every_example_once_with_fixed_shapes(pack):
  examples = _examples(40)
  batches = list(_sft(examples, batch_size=4, seq_len=16, pack=pack, num_epochs=2))
  for b in batches:
    assert set(b) == {"tokens_BxT", "loss_mask_BxT", "segment_ids_BxT", "positions_BxT"}
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


def test_sft_padding_and_pad_id():
  examples = [{"prompt_ids": [5, 6], "completion_ids": [7]}]
  (b,) = list(_sft(examples, batch_size=2, seq_len=6, pad_id=99))
  assert b["tokens_BxT"].tolist() == [[5, 6, 7, 99, 99, 99], [99] * 6]
  assert b["loss_mask_BxT"].tolist() == [[0, 0, 1, 0, 0, 0], [0] * 6]
  assert b["segment_ids_BxT"].tolist() == [[1, 1, 1, 0, 0, 0], [0] * 6]
  assert b["positions_BxT"].tolist() == [[0, 1, 2, 0, 0, 0], [0] * 6]


def test_sft_packing_layout():
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


def test_sft_overlong_examples():
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
def test_sft_bad_examples_name_the_example(bad, match):
  with pytest.raises(data.DataError, match=match):
    _sft([{"prompt_ids": [1], "completion_ids": [2]}, bad], batch_size=1, seq_len=8)


@pytest.mark.parametrize("pack", [True, False])
def test_sft_shards_disjoint_covering_equal_length(pack):
  examples = _examples(37, seed=1)
  per_shard = [list(_sft(examples, batch_size=2, seq_len=16, pack=pack, seed=4,
                         shard_index=k, shard_count=3)) for k in range(3)]
  assert len({len(bs) for bs in per_shard}) == 1
  segs = [s for bs in per_shard for b in bs for s in _segments(b)]
  assert collections.Counter(segs) == collections.Counter(_expected_segments(examples, 16))


@pytest.mark.parametrize("cuts", [(0, 3, 5, 8), (0, 8), (0, 1, 2, 3, 4, 5, 6, 7, 8), (0, 0, 6, 8)])
def test_sft_slot_ranges_concatenate_to_the_whole_batch(cuts):
  """How many processes share a stream changes no batch: the slot ranges of
  any partition of the global batch, side by side, are the one-range batches
  (also the last, padded one, and across epochs)."""
  examples = _examples(45, seed=3)
  kw = dict(batch_size=8, seq_len=16, seed=5, num_epochs=2, shard_index=None, shard_count=None)
  whole = list(_sft(examples, slots=(0, 8), **kw))
  parts = [list(_sft(examples, slots=(lo, hi), **kw)) for lo, hi in zip(cuts, cuts[1:])]
  assert len(whole) > 2 and all(len(p) == len(whole) for p in parts)
  for b, want in enumerate(whole):
    for key in want:
      np.testing.assert_array_equal(np.concatenate([p[b][key] for p in parts]), want[key])
  # shard k of S with batch b is slots k*b .. (k+1)*b of the global batch S*b
  shard = list(_sft(examples, batch_size=4, seq_len=16, seed=5, num_epochs=2, shard_index=1,
                    shard_count=2))
  for got, want in zip(shard, whole):
    np.testing.assert_array_equal(got["tokens_BxT"], want["tokens_BxT"][4:])


def test_state_of_one_slot_range_resumes_another():
  """A resumed run may have another process count: the state is a position in
  the global stream, so any slot range resumes at the same global batch."""
  examples = _examples(30, seed=4)
  kw = dict(batch_size=6, seq_len=16, seed=2, num_epochs=2, shard_index=None, shard_count=None)
  it = _sft(examples, slots=(0, 2), **kw)
  for _ in range(4):
    next(it)
  other = _sft(examples, slots=(2, 6), **kw)
  other.set_state(it.get_state())
  rest = list(other)
  want = list(_sft(examples, slots=(2, 6), **kw))[4:]
  assert len(rest) == len(want) > 0
  for got, w in zip(rest, want):
    np.testing.assert_array_equal(got["tokens_BxT"], w["tokens_BxT"])
  assert it.num_batches() == other.num_batches() == len(list(_sft(examples, slots=(0, 6), **kw)))


@pytest.mark.parametrize("slots,kw,match", [
    ((0, 9), {}, r"slots=\(0, 9\): expected \(lo, hi\) with 0 <= lo <= hi <= batch_size=8"),
    ((3, 2), {}, "slots=.3, 2."),
    ((0, 4), {"shard_index": 0, "shard_count": 2}, "give slots or a shard, not both"),
])
def test_bad_slots_are_refused(slots, kw, match):
  kw = {"shard_index": None, "shard_count": None, **kw}
  with pytest.raises(data.DataError, match=match):
    _sft(_examples(4), batch_size=8, seq_len=16, slots=slots, **kw)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_sft_resume_gives_the_next_batch(k, tmp_path):
  examples = _examples(12, seed=2)

  def build():
    return _sft(examples, batch_size=2, seq_len=16, seed=9, num_epochs=None)
  want, got, it, restored = _resume_check(build, k, tmp_path)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  for a, b in zip(itertools.islice(restored, 4), itertools.islice(it, 4)):
    np.testing.assert_array_equal(a["tokens_BxT"], b["tokens_BxT"])


def test_sft_resume_across_an_epoch_boundary(tmp_path):
  examples = _examples(12, seed=2)

  def build():
    return _sft(examples, batch_size=2, seq_len=16, seed=9, num_epochs=3)
  it = build()
  first_epoch = []
  while it.epoch == 0:
    first_epoch.append(next(it))
  epoch_len = len(first_epoch) - 1   # the last one taken already opened epoch 1
  assert epoch_len >= 2
  # save right after the epoch's last batch; the next one opens epoch 1
  want, got, _, restored = _resume_check(build, epoch_len, tmp_path)
  assert restored.epoch == 1
  np.testing.assert_array_equal(got["tokens_BxT"], want["tokens_BxT"])
  state = json.loads((tmp_path / "state.json").read_text())
  assert state["epoch"] == 0 and state["grain"] is not None, "saved at the epoch's end"


def test_sft_state_from_other_settings_is_refused():
  examples = _examples(6)
  it = _sft(examples, batch_size=2, seq_len=16)
  next(it)
  with pytest.raises(data.DataError, match="seq_len=16"):
    _sft(examples, batch_size=2, seq_len=32).set_state(it.get_state())
  with pytest.raises(data.DataError, match="kind"):
    data.problem_batches(examples, batch_size=2, seed=0, shard_index=0,
                         shard_count=1).set_state(it.get_state())


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size=0"),
    (dict(shard_index=2, shard_count=2), "shard_index=2 must be < shard_count=2"),
    (dict(shard_index=0), "give both or neither"),
    (dict(num_epochs=0), "num_epochs=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(drop_remainder=True, batch_size=20), "10 records leaves no full global batch of 20"),
])
def test_bad_arguments_name_the_value(kwargs, match):
  args = dict(batch_size=4, seed=0, shard_index=0, shard_count=1)
  if "shard_index" in kwargs and "shard_count" not in kwargs:
    args.pop("shard_count")
  args.update(kwargs)
  with pytest.raises(data.DataError, match=match):
    data.problem_batches(_problems(10), **args)
  with pytest.raises(data.DataError, match="empty"):
    data.problem_batches([], batch_size=1, seed=0, shard_index=0, shard_count=1)


# ---------------------------------------------------------------- processes


_CHILD = """
import json
from maft_jax import data
recs = [{"id": f"r{i}"} for i in range(30)]
it = data.problem_batches(recs, batch_size=4, seed=11, num_epochs=2, shard_index=1,
                          shard_count=2)
sft = data.sft_batches([{"prompt_ids": [i] * (i % 5), "completion_ids": [i + 100] * (1 + i % 3)}
                        for i in range(20)], batch_size=2, seq_len=8, seed=11, pad_id=0,
                       shard_index=0, shard_count=1)
print(json.dumps({"problems": [b.indices.tolist() for b in it],
                  "sft": [b["tokens_BxT"].tolist() for b in sft]}))
"""


def test_order_is_the_same_in_another_process():
  env = dict(os.environ, PYTHONHASHSEED="12345")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=120, check=True)
  child = json.loads(out.stdout.strip().splitlines()[-1])
  recs = [{"id": f"r{i}"} for i in range(30)]
  mine = [b.indices.tolist() for b in data.problem_batches(
      recs, batch_size=4, seed=11, num_epochs=2, shard_index=1, shard_count=2)]
  sft = data.sft_batches([{"prompt_ids": [i] * (i % 5), "completion_ids": [i + 100] * (1 + i % 3)}
                          for i in range(20)], batch_size=2, seq_len=8, seed=11, pad_id=0,
                         shard_index=0, shard_count=1)
  assert child["problems"] == mine
  assert child["sft"] == [b["tokens_BxT"].tolist() for b in sft]
