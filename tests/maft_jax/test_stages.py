"""maft_jax.stages and maft_jax.records: stage keys, and the typed stage records
written and read back (damaged or foreign ones are named, and a rerun refuses
them before any stage runs)."""

import jax
import numpy as np
import pytest

from maft_jax import config, stages


def test_stage_keys_are_derived_and_distinct():
  def data(key):
    return tuple(np.asarray(jax.random.key_data(key)).tolist())
  keys = {(k, s): data(stages.stage_key(7, k, s)) for k in range(4) for s in stages.NAMES}
  assert len(set(keys.values())) == len(keys)
  assert data(stages.stage_key(7, 2, "eval")) == keys[(2, "eval")]  # a pure function
  assert data(stages.stage_key(8, 2, "eval")) != keys[(2, "eval")]
  # fold_in along the path, never arithmetic on the seed
  want = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 2), stages.NAMES.index("eval"))
  assert data(want) == keys[(2, "eval")]


def test_stage_records_round_trip_and_damaged_or_foreign_ones_are_named(tmp_path):
  """A committed stage reads back as the record it wrote; a summary.json of
  another record version, cut short, or missing a field is an error naming
  the file (never silently read as a different record)."""
  import json
  import os

  from maft_jax import loop, records
  data = records.Finetune(examples=[3, 0], steps=[2, 0], final_loss=[0.5, None], tokens=40)
  stage = loop.Stage(str(tmp_path), 1, "finetune")
  stage.begin()
  # Checked as it will be read, before anything is committed.
  with pytest.raises(records.RecordError, match="'final_loss' must be"):
    stage.commit(1, "finetune", records.Finetune(examples=[1], steps=[1],
                                                 final_loss=[float("nan")], tokens=4), 1.0)
  with pytest.raises(records.RecordError, match="the finetune stage returned a Debate"):
    stage.commit(1, "finetune", records.Debate(problems=1, responses=2), 1.0)
  assert not stage.done
  stage.commit(1, "finetune", data, seconds=2.5)
  got = stage.record(1, "finetune")
  assert got == records.Record(1, "finetune", 2.5, data)
  assert records.parse(records.to_line(got), "x") == got
  path = os.path.join(stage.dir, "summary.json")
  raw = json.loads(open(path).read())
  for damaged, message in [(dict(raw, version=0), "record format version 0"),
                           (dict(raw, version=True), "record format version True"),
                           (dict(raw, version=1.0), "record format version 1.0"),
                           ({k: v for k, v in raw.items() if k != "steps"}, "has no 'steps'"),
                           (dict(raw, tokens=1.5), "'tokens' must be int")]:
    with open(path, "w") as f:
      json.dump(damaged, f)
    with pytest.raises(config.ConfigError, match=f"{path}: .*{message}"):
      stage.record(1, "finetune")
  with open(path, "w") as f:
    f.write(json.dumps(raw)[:20])
  with pytest.raises(config.ConfigError, match=f"{path}: not valid JSON"):
    stage.record(1, "finetune")
  # A rerun refuses such a workdir before any stage runs.
  plan = config.validate({"model": {"source": "demo"}, "iterations": 1})
  run = loop.Run(plan, str(tmp_path))
  with open(os.path.join(str(tmp_path), "config.json"), "w") as f:
    json.dump(plan.config, f)
  with pytest.raises(config.ConfigError, match=f"{path}: not valid JSON"):
    run.check_workdir()
  assert run._env is None  # nothing built, nothing loaded
