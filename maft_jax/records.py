"""The records the stages write and the report reads: one typed dataclass per
stage.

A finished stage writes its record as `iter_KK/<stage>/summary.json`; the
driver gathers them into `metrics.jsonl`, one object per stage:
{"version", "iteration", "stage", "seconds", **fields}. Writers build the
dataclass (a misspelt or missing field fails where it is written); readers
get it back through `parse`, which checks every field's type and names the
file, line and field that do not fit. A record of another `VERSION` is
refused, not guessed at.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Union

from maft_jax import files

VERSION = 1


class RecordError(ValueError):
  """A record that does not fit its stage's schema (the message says where)."""


@dataclasses.dataclass(frozen=True)
class Debate:
  problems: int                        # training problems debated
  responses: int                       # responses written (all rounds and slots)


@dataclasses.dataclass(frozen=True)
class Select:
  """Sizes of the selected sets. `selected` has one entry per agent (A = N
  generators, then N critics); `d_g` and star's lists one per generator, the
  `d_c_*` one per critic; `cross_copies` [role (generators, critics)][N]."""
  mode: str                            # config.selection.mode
  problems: int
  consensus_accuracy: float            # the last round's majority is right
  consensus_rate: float                # mean fraction of slots agreeing with it
  selected: list[int]                  # rows per agent
  d_g: list[int]                       # generators' kept round-1 responses
  d_c_minus: list[int] | None = None   # paper / ground_truth: critics corrected...
  d_c_plus: list[int] | None = None    # ... critics that stayed right
  d_c_kept: list[int] | None = None    # ... of those, the ones kept (critic_weight)
  rationalized: list[int] | None = None      # star: failures rationalised
  rationales_kept: list[int] | None = None   # star: verified rationalisations
  cross_copies: list[list[int]] | None = None  # cross_agent: copies per role and agent


@dataclasses.dataclass(frozen=True)
class Finetune:
  examples: list[int]                  # per agent
  steps: list[int]                     # optimizer updates per agent
  final_loss: list[float | None]       # last update's loss (None: no data)
  tokens: int                          # loss tokens over the stage


@dataclasses.dataclass(frozen=True)
class Eval:
  """`metrics.evaluate` of the held-out debate; `_se` = standard error."""
  problems: int
  round1_mean_accuracy: float
  round1_mean_accuracy_se: float
  round1_accuracy: list[float]
  round1_accuracy_se: list[float]
  final_accuracy: list[float]
  final_accuracy_se: list[float]
  debate_accuracy: float
  debate_accuracy_se: float
  majority_accuracy: float
  majority_accuracy_se: float
  best_of_n_accuracy: float
  best_of_n_accuracy_se: float
  consensus_rate: float
  distinct_answers: float
  ngram_overlap: float
  cross_nll: list[list[float]] | None = None   # [A_scorer, A_author] mean NLL
  cross_nll_problems: int | None = None


KINDS: dict[str, type] = {"debate": Debate, "select": Select, "finetune": Finetune,
                          "eval": Eval}
Data = Union[Debate, Select, Finetune, Eval]


@dataclasses.dataclass(frozen=True)
class Record:
  """One finished stage of a run."""
  iteration: int
  stage: str
  seconds: float
  data: Data


def to_json(data: Data, *, iteration: int, stage: str, seconds: float) -> dict:
  """summary.json's object for a stage's record, checked as `parse` will
  check it when read back (a value JSON cannot hold, e.g. a NaN loss, fails
  here, before the stage is committed)."""
  if not isinstance(data, KINDS.get(stage, ())):
    raise RecordError(f"the {stage} stage returned a {type(data).__name__} record")
  out = {"version": VERSION, "seconds": float(seconds), **dataclasses.asdict(data)}
  parse(json.loads(json.dumps({**out, "iteration": iteration, "stage": stage})),
        f"the {stage} record of iteration {iteration}")
  return out


def read_summary(path: str, iteration: int, stage: str) -> Record:
  """The record in a stage's summary.json."""
  raw = files.read_json(path, error=RecordError)
  if not isinstance(raw, dict):
    raise RecordError(f"{path}: expected a JSON object, got {type(raw).__name__}")
  return parse({**raw, "iteration": iteration, "stage": stage}, path)


def to_line(r: Record) -> dict:
  """metrics.jsonl's object for a record."""
  return {"version": VERSION, "iteration": r.iteration, "stage": r.stage,
          "seconds": r.seconds, **dataclasses.asdict(r.data)}


def read_lines(path: str, error: type[Exception] = RecordError) -> list[Record]:
  """The records of a metrics.jsonl file; `error` names its file and line."""
  out = []
  for lineno, raw in files.read_jsonl(path, error=error):
    try:
      out.append(parse(raw, f"{path}:{lineno}"))
    except RecordError as e:
      raise error(str(e)) from None
  return out


def _fits(value: Any, kind: Any) -> bool:
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if origin in (Union, types.UnionType):
    return any(_fits(value, a) for a in args)
  if kind is type(None):
    return value is None
  if origin is list:
    return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:  # JSON writes whole floats as ints; NaN never belongs in a record
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
  return isinstance(value, kind)


def _type_name(kind: Any) -> str:
  return kind.__name__ if typing.get_origin(kind) is None else str(kind)


def parse(raw: Any, where: str) -> Record:
  """The record in a metrics.jsonl object (`where`: its file and line)."""
  if not isinstance(raw, dict):
    raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")
  version = raw.get("version")
  if type(version) is not int or version != VERSION:  # True and 1.0 are not version 1
    raise RecordError(f"{where}: record format version {version!r}; this maft_jax "
                      f"reads version {VERSION}. Report it with the maft_jax that wrote it, or "
                      "rerun into a new workdir")
  iteration, stage, seconds = raw.get("iteration"), raw.get("stage"), raw.get("seconds")
  if not _fits(iteration, int) or iteration < 0:
    raise RecordError(f"{where}: 'iteration' must be an integer >= 0, got {iteration!r}")
  if stage not in KINDS:
    raise RecordError(f"{where}: 'stage' must be one of {', '.join(KINDS)}, got {stage!r}")
  if not _fits(seconds, float):
    raise RecordError(f"{where}: 'seconds' must be a number, got {seconds!r}")
  cls = KINDS[stage]
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  extra = set(raw) - set(fields) - {"version", "iteration", "stage", "seconds"}
  if extra:
    raise RecordError(f"{where}: unknown {stage} field(s) {sorted(extra)}")
  values = {}
  for name, f in fields.items():
    if name not in raw:
      if f.default is dataclasses.MISSING:
        raise RecordError(f"{where}: the {stage} record has no {name!r}")
      continue
    if not _fits(raw[name], hints[name]):
      raise RecordError(f"{where}: {stage} field {name!r} must be {_type_name(hints[name])}, "
                        f"got {raw[name]!r}")
    values[name] = raw[name]
  return Record(iteration, stage, float(seconds), cls(**values))
