r"""Debate evaluation of a population on the held-out problems of a run's task.

    python -m launch.evaluate --workdir=DIR [--iteration=K]
    python -m launch.evaluate --config=configs/x.py[:variant] --checkpoint=CKPT

With --workdir, evaluates the population a run reached after iteration K
(default: its latest finetuned population; 0 is the base) under the run's own
config. With --config and --checkpoint, evaluates any population checkpoint
with that config's task and evaluation settings. Prints the metrics as JSON
(and writes them to --output when given).

The evaluation runs on this machine's devices: `--mesh=agent=2,fsdp=-1`
sets the mesh (axes not given take the default mesh's sizes: agent, data,
tensor 1 and fsdp -1). A run whose own mesh does not fit here (e.g. saved on
a pod, evaluated on one card) is evaluated with the default mesh, fsdp over
every device; the metrics match up to floating-point differences.
"""

import dataclasses
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from launch import common
from maft_jax import checkpoint, config, files, loop, seeds, stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (with --checkpoint).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A launch.train run directory.")
_ITERATION = flags.DEFINE_integer("iteration", None, "Population after this iteration.",
                                  lower_bound=0)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Population checkpoint (with --config).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: the run's eval key, "
                             "derived from its config.seed).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the metrics JSON here too.")
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes for this evaluation, e.g. "
                            "agent=2,fsdp=-1; axes not given take the default mesh's sizes "
                            "(default: the run's mesh, when it fits here).")
_INIT_DISTRIBUTED = common.define_distributed_flags()


def main(argv):
  del argv
  _INIT_DISTRIBUTED()
  try:
    if _WORKDIR.value:
      if _CHECKPOINT.value:
        raise config.ConfigError("give --workdir or --checkpoint (with --config), not both")
      cfg_path = os.path.join(_WORKDIR.value, "config.json")
      if not os.path.isfile(cfg_path):
        raise config.ConfigError(f"{_WORKDIR.value}: no config.json (not a launch.train workdir)")
      with open(cfg_path) as f:
        wanted, note = common.mesh_for_here(json.load(f), _MESH.value)
      if note:
        logging.info(note)
      plan = config.validate(wanted)
      run = loop.Run(plan, _WORKDIR.value)
      done = [k for k in range(1, plan.iterations + 1)
              if os.path.isdir(run.population_path(k))]
      k = _ITERATION.value if _ITERATION.value is not None else max(done, default=0)
      if k and k not in done:
        raise config.ConfigError(f"--iteration={k}: {_WORKDIR.value} has finetuned "
                                 f"populations for iterations {done or 'none'}")
      key = stages.eval_key(plan.seed)
      source = f"{_WORKDIR.value} iteration {k}"
    else:
      if _CONFIG.value is None or not _CHECKPOINT.value:
        raise config.ConfigError("give --workdir, or --config with --checkpoint")
      checkpoint.read_meta(_CHECKPOINT.value)
      wanted = _CONFIG.value.to_dict()
      wanted["model"] = dict(wanted.get("model", {}), source="checkpoint",
                             path=_CHECKPOINT.value)
      if _MESH.value is not None:
        wanted, _ = common.mesh_for_here(wanted, _MESH.value)
      plan = config.validate(wanted)
      run = loop.Run(plan, _CHECKPOINT.value)  # nothing is written there
      k, key, source = 0, stages.eval_key(plan.seed), _CHECKPOINT.value
  except (config.ConfigError, checkpoint.CheckpointError) as e:
    raise SystemExit(f"error: {e}") from None
  if _SEED.value is not None:
    key = seeds.key(_SEED.value)
  pop = run.load_population(k)
  result, _, _ = stages.eval_debate(run.env, pop, key=key)
  result = {"source": source, **dataclasses.asdict(result)}
  text = json.dumps(result, indent=1)
  print(text)
  from maft_jax import distributed
  if _OUTPUT.value and distributed.is_primary():
    files.write_text(_OUTPUT.value, text + "\n")


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  common.quiet_orbax()
  app.run(main, flags_parser=common.parse_flags)
