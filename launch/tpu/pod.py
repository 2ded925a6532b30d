r"""Run maft_jax on a Cloud TPU VM slice: create it, copy the code, install,
train on every worker, stream the logs, delete it.

    python -m launch.tpu.pod --name=maft-v5p --zone=us-east5-a \
        --accelerator=v5p-64 --version=v2-alpha-tpuv5 [--project=P] [--spot] \
        --train_args="--config=configs/paper.py:model=llama3,task=math \
                      --config.model.path=/mnt/models/llama3 --workdir=/mnt/runs/llama3-math" \
        [--steps=create,copy,install,train,logs,delete] [--dry_run]

Every step is one `gcloud compute tpus tpu-vm ...` command (plus a local
`git archive` of HEAD for `copy`), run in order; the first that fails stops
the sequence, and its command line is printed so it can be rerun by hand.
`--dry_run` prints every command and runs none.

- `create`: the slice (`--spot` for spot capacity).
- `copy`: `git archive HEAD` (committed code only, no venv or runs) to every
  worker, unpacked into `~/maft_jax`.
- `install`: a venv on every worker with `jax[tpu]` and the requirements.
- `train`: `launch.train` on all workers at once (`--worker=all`), detached,
  output in `~/maft_jax/train.log` on each worker. On a TPU slice every worker
  is one JAX process; `--coordinator_address=auto` lets
  `jax.distributed.initialize()` find the others.
- `logs`: follows worker 0's log (Ctrl-C stops following, not training).
- `delete`: the slice (`--quiet`: no prompt).

The run directory must be reachable from every worker under the same path
(a mounted bucket or filestore), since every process restores checkpoints.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence

from absl import app, flags

STEPS = ("create", "copy", "install", "train", "logs", "delete")
ARCHIVE = "/tmp/maft_jax.tar.gz"
REMOTE_DIR = "~/maft_jax"

_NAME = flags.DEFINE_string("name", None, "TPU VM (slice) name.", required=True)
_ZONE = flags.DEFINE_string("zone", None, "GCE zone, e.g. us-east5-a.", required=True)
_PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
_ACCEL = flags.DEFINE_string("accelerator", "v5p-8", "Accelerator type, e.g. v5p-64, v4-32.")
_VERSION = flags.DEFINE_string("version", "v2-alpha-tpuv5", "TPU VM software version.")
_SPOT = flags.DEFINE_bool("spot", False, "Create the slice on spot capacity.")
_STEPS = flags.DEFINE_list("steps", list(STEPS), f"Steps to run, in order: {', '.join(STEPS)}.")
_TRAIN_ARGS = flags.DEFINE_string("train_args", "", "Arguments of launch.train on every worker.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command instead of running it.")


def _tpu(verb: str, name: str, zone: str, project: str | None, *rest: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, name, f"--zone={zone}"]
  if project:
    cmd.append(f"--project={project}")
  return cmd + list(rest)


def _ssh(name: str, zone: str, project: str | None, worker: str, command: str) -> list[str]:
  return _tpu("ssh", name, zone, project, f"--worker={worker}", f"--command={command}")


def commands(step: str, *, name: str, zone: str, project: str | None = None,
             accelerator: str = "v5p-8", version: str = "v2-alpha-tpuv5", spot: bool = False,
             train_args: str = "") -> list[list[str]]:
  """The command lines (argv lists) of one step."""
  if step == "create":
    return [_tpu("create", name, zone, project, f"--accelerator-type={accelerator}",
                 f"--version={version}", *(["--spot"] if spot else []))]
  if step == "copy":
    return [["git", "archive", "--format=tar.gz", f"--output={ARCHIVE}", "HEAD"],
            _tpu("scp", name, zone, project, "--worker=all", ARCHIVE, f"{name}:{ARCHIVE}"),
            _ssh(name, zone, project, "all",
                 f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
                 f"tar -xzf {ARCHIVE} -C {REMOTE_DIR}")]
  if step == "install":
    return [_ssh(name, zone, project, "all",
                 f"cd {REMOTE_DIR} && python3 -m venv .venv && "
                 ".venv/bin/pip install -q -U pip && "
                 ".venv/bin/pip install -q 'jax[tpu]' -r requirements.txt")]
  if step == "train":
    return [_ssh(name, zone, project, "all",
                 f"cd {REMOTE_DIR} && nohup .venv/bin/python -m launch.train {train_args} "
                 "--coordinator_address=auto > train.log 2>&1 < /dev/null &")]
  if step == "logs":
    return [_ssh(name, zone, project, "0", f"tail -n +1 -F {REMOTE_DIR}/train.log")]
  if step == "delete":
    return [_tpu("delete", name, zone, project, "--quiet")]
  raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")


def plan(steps: Sequence[str], **kwargs) -> list[list[str]]:
  """Every command of `steps`, in order; unknown steps fail before any runs."""
  bad = [s for s in steps if s not in STEPS]
  if bad:
    raise ValueError(f"unknown step(s) {bad}; steps: {', '.join(STEPS)}")
  if "train" in steps and not kwargs.get("train_args", "").strip():
    raise ValueError("the train step needs --train_args (at least --config and --workdir)")
  return [cmd for s in steps for cmd in commands(s, **kwargs)]


def main(argv):
  del argv
  try:
    cmds = plan(_STEPS.value, name=_NAME.value, zone=_ZONE.value, project=_PROJECT.value,
                accelerator=_ACCEL.value, version=_VERSION.value, spot=_SPOT.value,
                train_args=_TRAIN_ARGS.value)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  for cmd in cmds:
    line = shlex.join(cmd)
    print(line, flush=True)
    if _DRY_RUN.value:
      continue
    rc = subprocess.call(cmd)
    if rc != 0:
      sys.exit(f"error: exit status {rc} from: {line}")


if __name__ == "__main__":
  app.run(main)
