"""launch.tpu.pod: the gcloud command lines for a named slice and zone, printed
by --dry_run (nothing is run), and refusals of incomplete requests."""

import shlex

import pytest

from launch.tpu import pod
from tests import cli

TRAIN = "--config=configs/paper.py:model=llama3,task=math --workdir=/mnt/runs/x"


def test_dry_run_prints_every_command_in_order():
  proc = cli.run("tpu.pod", "--name=maft-v5p", "--zone=us-east5-a", "--project=my-proj",
                 "--accelerator=v5p-64", "--spot", f"--train_args={TRAIN}", "--dry_run")
  lines = proc.stdout.strip().splitlines()
  where = "--zone=us-east5-a --project=my-proj"
  assert lines == [
      f"gcloud compute tpus tpu-vm create maft-v5p {where} --accelerator-type=v5p-64 "
      "--version=v2-alpha-tpuv5 --spot",
      "git archive --format=tar.gz --output=/tmp/maft_jax.tar.gz HEAD",
      f"gcloud compute tpus tpu-vm scp maft-v5p {where} --worker=all /tmp/maft_jax.tar.gz "
      "maft-v5p:/tmp/maft_jax.tar.gz",
      f"gcloud compute tpus tpu-vm ssh maft-v5p {where} --worker=all "
      + shlex.quote("--command=rm -rf ~/maft_jax && mkdir -p ~/maft_jax && "
                    "tar -xzf /tmp/maft_jax.tar.gz -C ~/maft_jax"),
      f"gcloud compute tpus tpu-vm ssh maft-v5p {where} --worker=all "
      + shlex.quote("--command=cd ~/maft_jax && python3 -m venv .venv && "
                    ".venv/bin/pip install -q -U pip && "
                    ".venv/bin/pip install -q 'jax[tpu]' -r requirements.txt"),
      f"gcloud compute tpus tpu-vm ssh maft-v5p {where} --worker=all "
      + shlex.quote(f"--command=cd ~/maft_jax && nohup .venv/bin/python -m launch.train {TRAIN} "
                    "--coordinator_address=auto > train.log 2>&1 < /dev/null &"),
      f"gcloud compute tpus tpu-vm ssh maft-v5p {where} --worker=0 "
      + shlex.quote("--command=tail -n +1 -F ~/maft_jax/train.log"),
      f"gcloud compute tpus tpu-vm delete maft-v5p {where} --quiet",
  ]
  # Printed lines are shell-exact: splitting one gives the argv that would run.
  assert shlex.split(lines[-3]) == pod.commands(
      "train", name="maft-v5p", zone="us-east5-a", project="my-proj", train_args=TRAIN)[0]


def test_selected_steps_and_refusals():
  cmds = pod.plan(["create", "delete"], name="n", zone="z")
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "create", "n", "--zone=z",
                   "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5"],
                  ["gcloud", "compute", "tpus", "tpu-vm", "delete", "n", "--zone=z", "--quiet"]]
  with pytest.raises(ValueError, match="unknown step"):
    pod.plan(["create", "launch"], name="n", zone="z")
  with pytest.raises(ValueError, match="needs --train_args"):
    pod.plan(["train"], name="n", zone="z")
  proc = cli.run("tpu.pod", "--name=n", "--zone=z", "--steps=train", "--dry_run", check=False)
  assert proc.returncode != 0 and "needs --train_args" in proc.stderr and not proc.stdout
