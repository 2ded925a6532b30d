"""A deterministic, checkpointable SFT input pipeline (grain).

    sft_batches(examples, batch_size=B, seq_len=T, seed=S, pad_id=P)
        ->  {"tokens_BxT", "loss_mask_BxT", "segment_ids_BxT", "positions_BxT"}

Every batch has the same shape, so a jitted step compiles once.

**Order.** Epoch `e` visits the examples in a permutation that depends only on
`(seed, e)` (see `epoch_order`), so it differs from epoch to epoch and is the
same in every process, run, machine and NumPy version. (grain's
`MapDataset.shuffle` is not used for it: its index shuffle costs about 30 ms
per permutation however small, and 14 us per record, in grain 0.2.18.)

**Sharding.** The epoch's permutation is cut into *rows* (a row is one
packed sequence of examples; see SFT rows), and batch `j` of the global
stream holds rows `j*G ... j*G + G - 1` (`G` the global batch size).
A pipeline yields one contiguous *slot range* of every global batch: process
`k` of `S` (`shard_index`, `shard_count`, `batch_size` rows each, so
`G = S * batch_size`) takes slots `k*batch_size ... (k+1)*batch_size - 1`;
or `slots=(lo, hi)` with `batch_size=G` takes slots `lo ... hi - 1` (the rows
that the devices of one process hold; see `sft.run`). Slot ranges are
disjoint and together cover every example exactly once per epoch, every range
yields the same number of batches, and the batches that the ranges of any
partition of `0 ... G` yield, concatenated, are the batches of the one
pipeline that yields all `G` slots: how many processes share the stream
changes no batch. Slots past the epoch's last row are padding (empty rows:
segment 0, loss 0), or with `drop_remainder` the epoch stops at its last
full global batch.

**State.** `it.get_state()` is a JSON-serialisable dict: the epoch, grain's
own iterator state within that epoch, and a fingerprint of the global stream.
Rebuilding the pipeline with the same arguments and calling
`it.set_state(state)` resumes at exactly the next batch; a state saved by a
different stream (another seed, global batch size, data ...) is refused with
an error that names the field. The slot range is not part of the stream: a
state saved by one shard resumes any other shard (or the whole batch) at the
same global batch, so a run can resume on another number of processes
(`sft.run` stores the states in its training checkpoints). The number of
epochs is not part of the fingerprint, so a finished run can be extended.

**SFT rows.** Examples are `{"prompt_ids": [...], "completion_ids": [...]}`.
With `pack=True` (default) several examples share a row, placed first-fit in
epoch order over the last `pack_window` open rows; an example never straddles
rows. In a row, segment ids are 1, 2, 3, ... in placement order (0 is
padding, always at the end of the row), positions restart at 0 in every
segment, and `loss_mask` is 1 exactly at the positions that hold a completion
token (the trainer predicts token `t` from the logits at `t - 1` of the same
segment). With `pack=False` each row holds one example. An example longer
than `seq_len` loses prompt tokens from the left (`overlong="truncate_prompt"`,
the default; at least one prompt token is kept) or is refused
(`overlong="error"`); a completion that cannot fit is always refused. Bad
examples are refused when the pipeline is built, naming the example's index.

Batches are built synchronously in the calling thread by default (they are
cheap); pass a `grain.ReadOptions` to prefetch in threads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

STATE_FORMAT = "maft_jax.data.iterator"
STATE_VERSION = 2  # 2: shards are slot ranges of a global stream
OVERLONG_POLICIES = ("truncate_prompt", "error")


class DataError(ValueError):
  """Bad pipeline arguments, examples or iterator state; names the value."""


# ---------------------------------------------------------------- small pieces


def _check_int(name: str, value: Any, *, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise DataError(f"{name}={value!r}: expected an integer >= {minimum}")
  return int(value)


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  """(index, count), from `jax.process_index()/process_count()` when both are None."""
  if (shard_index is None) != (shard_count is None):
    raise DataError(f"shard_index={shard_index!r}, shard_count={shard_count!r}: "
                    "give both or neither")
  if shard_index is None:
    import jax  # deferred: building a pipeline with explicit shards needs no jax
    shard_index, shard_count = jax.process_index(), jax.process_count()
  shard_count = _check_int("shard_count", shard_count, minimum=1)
  shard_index = _check_int("shard_index", shard_index, minimum=0)
  if shard_index >= shard_count:
    raise DataError(f"shard_index={shard_index} must be < shard_count={shard_count}")
  return shard_index, shard_count


def epoch_order(num_records: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  """int64[N]: the order in which epoch `epoch` visits records 0..N-1.

  The permutation sorts N raw 64-bit draws of PCG64 seeded by
  `SeedSequence([seed, epoch])`. NumPy keeps bit-generator streams and
  SeedSequence stable across versions and platforms (NEP 19), and a stable
  argsort is deterministic, so the order never depends on the NumPy version.
  """
  if not shuffle:
    return np.arange(num_records, dtype=np.int64)
  bits = np.random.PCG64(np.random.SeedSequence([seed, epoch])).random_raw(num_records)
  return np.argsort(bits, kind="stable").astype(np.int64)


def pack_rows(order: Sequence[int], lengths: Sequence[int], seq_len: int, *,
              window: int) -> list[tuple[int, ...]]:
  """Rows of example indices, each totalling <= seq_len tokens.

  Examples are taken in `order`; each goes into the first of the (at most
  `window`) most recently opened rows with room for it, else opens a row.
  Rows come back in the order they were opened.
  """
  rows: list[list[int]] = []
  room: list[int] = []
  open_rows: list[int] = []          # indices into rows, oldest first
  for i in order:
    need = int(lengths[i])
    if need > seq_len:
      raise DataError(f"example {i} has {need} tokens > seq_len={seq_len}")
    target = next((r for r in open_rows if room[r] >= need), None)
    if target is None:
      target = len(rows)
      rows.append([])
      room.append(seq_len)
      open_rows.append(target)
      if len(open_rows) > window:
        open_rows.pop(0)
    rows[target].append(int(i))
    room[target] -= need
    if room[target] == 0:
      open_rows.remove(target)
  return [tuple(r) for r in rows]


def resolve_slots(batch_size: int, shard_index: int | None, shard_count: int | None,
                  slots: tuple[int, int] | None) -> tuple[int, int, int]:
  """(global batch size, lo, hi): the slot range of every global batch that a
  pipeline yields (see the module docstring)."""
  batch_size = _check_int("batch_size", batch_size, minimum=1)
  if slots is None:
    shard_index, shard_count = resolve_shard(shard_index, shard_count)
    lo = shard_index * batch_size
    return shard_count * batch_size, lo, lo + batch_size
  if shard_index is not None or shard_count is not None:
    raise DataError(f"slots={slots!r} with shard_index={shard_index!r}, "
                    f"shard_count={shard_count!r}: give slots or a shard, not both")
  if (not isinstance(slots, (tuple, list)) or len(slots) != 2
      or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in slots)
      or not 0 <= slots[0] <= slots[1] <= batch_size):
    raise DataError(f"slots={slots!r}: expected (lo, hi) with 0 <= lo <= hi <= "
                    f"batch_size={batch_size}")
  return batch_size, int(slots[0]), int(slots[1])


def num_global_batches(num_rows: int, global_batch: int, drop_remainder: bool) -> int:
  return num_rows // global_batch if drop_remainder else math.ceil(num_rows / global_batch)


def batch_rows(b: int, num_rows: int, global_batch: int, lo: int, hi: int) -> range:
  """The global row ids in slots lo..hi-1 of batch `b` (fewer at the epoch's end)."""
  return range(min(b * global_batch + lo, num_rows), min(b * global_batch + hi, num_rows))


def _digest(chunks: Iterator[bytes]) -> str:
  h = hashlib.sha256()
  for c in chunks:
    h.update(len(c).to_bytes(8, "little"))
    h.update(c)
  return h.hexdigest()[:16]


# ---------------------------------------------------------------- the iterator


class DataIterator:
  """Batches of a pipeline, epoch by epoch, with JSON state.

    it = sft_batches(...)
    batch = next(it)
    state = it.get_state()               # JSON-serialisable
    it2 = sft_batches(...)               # same arguments
    it2.set_state(state)                 # next(it2) is the batch next(it) gives

  `build_epoch(e)` returns the `grain.MapDataset` of epoch `e`'s batches for
  this shard; each epoch is read through `to_iter_dataset()` and grain's
  iterator `get_state` / `set_state` position within it.
  """

  def __init__(self, *, fingerprint: Mapping[str, Any], num_epochs: int | None,
               build_epoch: Callable[[int], grain.MapDataset],
               read_options: grain.ReadOptions | None = None):
    self._fingerprint = json.loads(json.dumps(dict(fingerprint)))
    self._num_epochs = num_epochs
    self._build_epoch = build_epoch
    self._read_options = read_options or grain.ReadOptions(num_threads=0,
                                                           prefetch_buffer_size=0)
    self._epoch = 0
    self._it: Any = None      # grain iterator over the current epoch, None = not started

  def num_batches(self) -> int | None:
    """Batches in all epochs, from the start (None when it repeats forever).
    Counts without building a batch (SFT packs each epoch again: cheap)."""
    if self._num_epochs is None:
      return None
    return sum(len(self._build_epoch(e)) for e in range(self._num_epochs))

  def __iter__(self) -> DataIterator:
    return self

  def _start_epoch(self) -> None:
    ds = self._build_epoch(self._epoch)
    self._it = iter(ds.to_iter_dataset(self._read_options))

  def _end_epoch(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()
    self._it = None
    self._epoch += 1

  def __next__(self) -> Any:
    while self._num_epochs is None or self._epoch < self._num_epochs:
      if self._it is None:
        self._start_epoch()
      try:
        return next(self._it)
      except StopIteration:
        self._end_epoch()
    raise StopIteration

  def get_state(self) -> dict[str, Any]:
    grain_state = None if self._it is None else self._it.get_state()
    state = {"format": STATE_FORMAT, "version": STATE_VERSION,
             "pipeline": self._fingerprint, "epoch": self._epoch, "grain": grain_state}
    try:
      return json.loads(json.dumps(state))
    except (TypeError, ValueError) as e:
      raise DataError(f"grain iterator state {grain_state!r} is not JSON-serialisable "
                      f"(grain {getattr(grain, '__version__', '?')})") from e

  def set_state(self, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
      fmt = state.get("format") if isinstance(state, Mapping) else type(state).__name__
      raise DataError(f"iterator state format {fmt!r}; expected {STATE_FORMAT!r}")
    if state.get("version") != STATE_VERSION:
      raise DataError(f"iterator state version {state.get('version')!r}; "
                      f"this code reads version {STATE_VERSION}")
    saved = state.get("pipeline", {})
    for key in ["kind"] + sorted((set(saved) | set(self._fingerprint)) - {"kind"}):
      if saved.get(key) != self._fingerprint.get(key):
        raise DataError(f"iterator state was saved by a pipeline with {key}="
                        f"{saved.get(key)!r}; this pipeline has {key}="
                        f"{self._fingerprint.get(key)!r}")
    epoch = state.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0 or (
        self._num_epochs is not None and epoch > self._num_epochs):
      raise DataError(f"iterator state epoch={epoch!r} is outside this pipeline's "
                      f"num_epochs={self._num_epochs}")
    if self._it is not None:
      close = getattr(self._it, "close", None)
      if close is not None:
        close()
    self._epoch, self._it = epoch, None
    if state.get("grain") is not None:
      self._start_epoch()
      try:
        self._it.set_state(state["grain"])
      except (IndexError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"grain state {state['grain']!r} for epoch {epoch} does not "
                        f"fit this pipeline: {e}") from e


# ---------------------------------------------------------------- SFT


@dataclasses.dataclass(frozen=True)
class _Example:
  tokens: np.ndarray      # int32[L], prompt then completion
  prompt_len: int


def _token_array(index: int, key: str, value: Any) -> np.ndarray:
  arr = np.asarray(value)
  if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
    raise DataError(f"example {index}: {key} must be a flat list of integer token "
                    f"ids, got {type(value).__name__} of dtype {arr.dtype}, shape {arr.shape}")
  if arr.size and (arr.min() < 0 or arr.max() >= 2**31):
    bad = arr[(arr < 0) | (arr >= 2**31)][0]
    raise DataError(f"example {index}: {key} holds token id {int(bad)}, outside int32 >= 0")
  return arr.astype(np.int32)


def prepare_example(index: int, example: Mapping[str, Any], *, seq_len: int,
                    overlong: str) -> _Example:
  """Validates one SFT example and fits it into `seq_len` tokens."""
  if not isinstance(example, Mapping) or "prompt_ids" not in example or (
      "completion_ids" not in example):
    got = sorted(example) if isinstance(example, Mapping) else type(example).__name__
    raise DataError(f"example {index}: expected a dict with 'prompt_ids' and "
                    f"'completion_ids', got {got}")
  prompt = _token_array(index, "prompt_ids", example["prompt_ids"])
  completion = _token_array(index, "completion_ids", example["completion_ids"])
  if completion.size == 0:
    raise DataError(f"example {index}: completion_ids is empty (no tokens to train on)")
  excess = prompt.size + completion.size - seq_len
  if excess > 0:
    keep_prompt = min(prompt.size, 1)
    if completion.size + keep_prompt > seq_len:
      raise DataError(f"example {index}: completion of {completion.size} tokens (plus "
                      f"{keep_prompt} prompt token) does not fit seq_len={seq_len}")
    if overlong == "error":
      raise DataError(f"example {index}: {prompt.size} prompt + {completion.size} "
                      f"completion tokens > seq_len={seq_len} (overlong='error')")
    prompt = prompt[excess:]
  return _Example(tokens=np.concatenate([prompt, completion]), prompt_len=int(prompt.size))


def _sft_batch(rows: Sequence[tuple[int, ...]], *, examples: Sequence[_Example],
               batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  shape = (batch_size, seq_len)
  tokens_BxT = np.full(shape, pad_id, dtype=np.int32)
  loss_mask_BxT = np.zeros(shape, dtype=np.int32)
  segment_ids_BxT = np.zeros(shape, dtype=np.int32)
  positions_BxT = np.zeros(shape, dtype=np.int32)
  arange_T = np.arange(seq_len, dtype=np.int32)
  for r, row in enumerate(rows):
    start = 0
    for segment, i in enumerate(row, start=1):
      ex = examples[i]
      end = start + ex.tokens.size
      tokens_BxT[r, start:end] = ex.tokens
      loss_mask_BxT[r, start + ex.prompt_len:end] = 1
      segment_ids_BxT[r, start:end] = segment
      positions_BxT[r, start:end] = arange_T[:ex.tokens.size]
      start = end
  return {"tokens_BxT": tokens_BxT, "loss_mask_BxT": loss_mask_BxT,
          "segment_ids_BxT": segment_ids_BxT, "positions_BxT": positions_BxT}


def sft_batches(examples: Sequence[Mapping[str, Any]], *, batch_size: int, seq_len: int,
                seed: int, pad_id: int, pack: bool = True, pack_window: int = 8,
                epoch_shuffle: bool = True, shard_index: int | None = None,
                shard_count: int | None = None, slots: tuple[int, int] | None = None,
                num_epochs: int | None = 1, drop_remainder: bool = False,
                overlong: str = "truncate_prompt",
                read_options: grain.ReadOptions | None = None) -> DataIterator:
  """Dicts of int32[rows, seq_len] arrays, `rows` = `batch_size` (or `hi - lo`
  with `slots`); see the module docstring.

  Every process packs the whole epoch (it needs only the examples' lengths,
  and all must agree on the rows), but builds the arrays of its own slots
  only. Slots past the epoch's last packed row are all padding (segment 0,
  loss 0) unless `drop_remainder`. The number of batches per epoch can change
  from epoch to epoch when packing (the order changes), but is the same for
  every slot range.
  """
  examples = list(examples)
  if not examples:
    raise DataError("sft_batches: examples is empty")
  G, lo, hi = resolve_slots(batch_size, shard_index, shard_count, slots)
  seq_len = _check_int("seq_len", seq_len, minimum=1)
  seed = _check_int("seed", seed, minimum=0)
  pack_window = _check_int("pack_window", pack_window, minimum=1)
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not (
      -2**31 <= pad_id < 2**31):
    raise DataError(f"pad_id={pad_id!r}: expected an int32 token id")
  if overlong not in OVERLONG_POLICIES:
    raise DataError(f"overlong={overlong!r}; choose one of {OVERLONG_POLICIES}")
  if num_epochs is not None:
    num_epochs = _check_int("num_epochs", num_epochs, minimum=1)
  prepared = [prepare_example(i, ex, seq_len=seq_len, overlong=overlong)
              for i, ex in enumerate(examples)]
  lengths = np.array([ex.tokens.size for ex in prepared], dtype=np.int64)
  n = len(prepared)

  def build_epoch(epoch: int) -> grain.MapDataset:
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=epoch_shuffle)
    if pack:
      rows = pack_rows(order, lengths, seq_len, window=pack_window)
    else:
      rows = [(int(i),) for i in order]
    num_batches = num_global_batches(len(rows), G, drop_remainder)
    if num_batches == 0:
      raise DataError(f"epoch {epoch}: drop_remainder with {len(rows)} rows leaves no "
                      f"full global batch of {G}")

    def make(b: int) -> dict[str, np.ndarray]:
      mine = batch_rows(b, len(rows), G, lo, hi)
      return _sft_batch([rows[j] for j in mine], examples=prepared, batch_size=hi - lo,
                        seq_len=seq_len, pad_id=pad_id)
    return grain.MapDataset.range(num_batches).map(make)

  digest = _digest(c for ex in prepared
                   for c in (ex.tokens.tobytes(), ex.prompt_len.to_bytes(8, "little")))
  fingerprint = {"kind": "sft_batches", "num_examples": n, "examples_digest": digest,
                 "global_batch_size": G, "seq_len": seq_len, "seed": seed,
                 "pad_id": int(pad_id), "pack": bool(pack), "pack_window": pack_window,
                 "epoch_shuffle": bool(epoch_shuffle), "drop_remainder": bool(drop_remainder),
                 "overlong": overlong}
  return DataIterator(fingerprint=fingerprint, num_epochs=num_epochs,
                      build_epoch=build_epoch, read_options=read_options)
