"""Shared by the entry points: flags, config overrides, the mesh, logging."""

from __future__ import annotations

import logging

import jax

from maft_jax import sharding


class _DropOrbaxInfo(logging.Filter):
  """orbax logs every save and restore step at INFO; keep its warnings only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_orbax() -> None:
  from absl import logging as absl_logging
  absl_logging.get_absl_handler().addFilter(_DropOrbaxInfo())


TASK_OPTION_FLAG = "--config.task.options."


def parse_flags(argv: list[str], flag_values=None) -> list[str]:
  """absl's flag parsing, but a bad flag or `--config.x=` override (unknown
  field, wrong type) exits with one line naming that one flag instead of a
  traceback, and `--config.task.options.KEY=VALUE` reaches the task even
  when the config file did not declare KEY (the task itself then refuses an
  option it does not know, naming its options)."""
  import sys

  from absl import flags
  fv = flags.FLAGS if flag_values is None else flag_values
  options = [a for a in argv[1:] if a.startswith(TASK_OPTION_FLAG)]
  rest = [a for a in argv if a not in options]
  saved_argv, sys.argv = sys.argv, rest  # ml_collections reads overrides from sys.argv too
  try:
    out = fv(rest)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    inner = e.args[0] if e.args else e
    # ml_collections wraps a KeyError in an AttributeError: unwrap to the text.
    while isinstance(inner, BaseException) and inner.args:
      inner = inner.args[0]
    message = str(inner)
    if isinstance(e, (AttributeError, KeyError)):
      field = message.splitlines()[0].strip("'\"")
      sys.exit(f"error: unknown config field {message.splitlines()[0]} in "
               f"{_flag_naming(rest, field)}"
               + "".join(f"; {line}" for line in message.splitlines()[1:]))
    if "Traceback" in message:  # a config file that raised: its first and last lines
      lines = [line for line in message.splitlines() if line.strip()]
      message = f"{lines[0]} {lines[-1]}"
    sys.exit(f"error: {message}")
  finally:
    sys.argv = saved_argv
  if options:
    if "config" not in fv or fv.config is None:
      sys.exit(f"error: {options[0]} needs --config")
    for arg in options:
      key, sep, text = arg[len(TASK_OPTION_FLAG):].partition("=")
      if not sep or not key or "." in key:
        sys.exit(f"error: {arg}: expected {TASK_OPTION_FLAG}KEY=VALUE")
      task_options = fv.config.task.options
      kind = task_options.get_type(key) if key in task_options else None
      kind = kind if kind in (bool, str, int, float) else None  # others: inferred
      with task_options.unlocked():
        task_options[key] = option_value(text, kind)
  return out


def _flag_naming(argv: list[str], field: str) -> str:
  """The one `--config.` flag whose field path holds `field` (all of them
  if none does)."""
  config_args = [a for a in argv[1:] if a.startswith("--config.")]
  for a in config_args:
    if field in a.split("=", 1)[0].split("."):
      return a
  return " ".join(config_args)


def option_value(text: str, kind: type | None = None):
  """A task option's value from the command line: of the type the config
  file declared for it (`kind`), else an int, float, bool (true/false) or
  string, whichever parses first."""
  def bad(expected: str):
    return SystemExit(f"error: {TASK_OPTION_FLAG}...={text}: expected {expected}")
  if kind is bool or (kind is None and text.lower() in ("true", "false")):
    if text.lower() not in ("true", "false"):
      raise bad("true or false")
    return text.lower() == "true"
  if kind is str:
    return text
  for k in ((kind,) if kind in (int, float) else (int, float)):
    try:
      return k(text)
    except ValueError:
      if kind is not None:
        raise bad(kind.__name__) from None
  return text


def define_distributed_flags():
  """--coordinator_address / --num_processes / --process_id; returns the
  function that joins the processes (call it first thing in main)."""
  from absl import flags

  from maft_jax import distributed
  address = flags.DEFINE_string(
      "coordinator_address", None, "HOST:PORT of process 0, to run as one of several "
      "processes (with --num_processes and --process_id); 'auto' alone: let JAX detect them "
      "(Cloud TPU slices, SLURM, ...).")
  count = flags.DEFINE_integer("num_processes", None, "Number of processes.")
  index = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")

  def initialize() -> None:
    try:
      distributed.initialize(address.value, count.value, index.value)
    except ValueError as e:
      raise SystemExit(f"error: {e}") from None
  return initialize


def mesh_for_here(config: dict, text: str | None) -> tuple[dict, str | None]:
  """(config with the mesh this evaluation uses, a note when it is not the
  config's own). `text` is --mesh: `axis=size` pairs over the default mesh."""
  from maft_jax import config as run_config  # deferred: the other launch commands need none of it
  default = run_config.default_config().mesh.to_dict()
  if text is not None:
    mesh, given = dict(default), set()
    for item in text.split(","):
      axis, _, size = (x.strip() for x in item.partition("="))
      try:
        value = int(size)
      except ValueError:
        value = None
      if axis not in default or axis in given or value is None:
        raise run_config.ConfigError(f"--mesh={text}: expected distinct axis=size pairs over the "
                               f"axes {sorted(default)}, e.g. agent=2,fsdp=-1")
      mesh[axis] = value
      given.add(axis)
    return {**config, "mesh": mesh}, None
  try:
    sharding.mesh_shape(config.get("mesh", default), jax.device_count())
    return config, None
  except sharding.MeshError as e:
    return {**config, "mesh": default}, (
        f"the run's mesh does not fit here ({e}); evaluating with {default}")
