"""Mesh construction and the logical-axis rule table.

Every array the program touches carries logical axis names (`model.param_axes`,
`population.axes`, `model.cache_axes`, and the activations the model pins with
`constrain`); one rule table maps them onto the mesh axes ('agent', 'data',
'fsdp', 'tensor'). A mesh axis that does not divide a
dimension is dropped for that array (replicated instead), so tiny test models
and odd head counts still shard.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("agent", "data", "fsdp", "tensor")

# logical axis -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("agent", "agent"),
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("length", None),
    ("cache_len", None),
    # Activations: split on batch and on the tensor-parallel dims (heads, mlp,
    # vocab); their model dim is not pinned (FSDP splits the weights on it).
    ("activation_embed", None),
)


class MeshError(ValueError):
  pass


def mesh_shape(sizes: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolve axis sizes (one may be -1) against the device count."""
  if isinstance(sizes, Mapping):
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
      raise MeshError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [sizes.get(a, 1) for a in MESH_AXES]
  sizes = [int(s) for s in sizes]
  if len(sizes) != len(MESH_AXES):
    raise MeshError(f"mesh needs {len(MESH_AXES)} sizes for {MESH_AXES}, got {sizes}")
  named = dict(zip(MESH_AXES, sizes))
  fill = [a for a, s in named.items() if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"mesh sizes {named}: each must be positive, at most one may be -1")
  known = int(np.prod([s for s in sizes if s != -1]))
  if fill:
    if num_devices % known:
      raise MeshError(f"mesh sizes {named} cannot fill {num_devices} devices: "
                      f"{num_devices} is not a multiple of {known}")
    named[fill[0]] = num_devices // known
  total = int(np.prod(list(named.values())))
  if total != num_devices:
    raise MeshError(f"mesh sizes {named} multiply to {total}, but there are "
                    f"{num_devices} devices")
  return tuple(named[a] for a in MESH_AXES)


def make_mesh(sizes: Mapping[str, int] | Sequence[int] = (1, 1, -1, 1), devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (AssertionError, ValueError, NotImplementedError):
    grid = np.array(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules=DEFAULT_RULES) -> PartitionSpec:
  """PartitionSpec for one array; mesh axes that do not divide are dropped."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    chosen = []
    for mesh_axis in targets:
      size = mesh.shape[mesh_axis]
      prod = int(np.prod([mesh.shape[a] for a in chosen])) * size
      if mesh_axis in used or size == 1 or dim % prod:
        continue
      chosen.append(mesh_axis)
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return PartitionSpec(*spec)


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def shardings(axes_tree, shapes_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every leaf of `shapes_tree` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(
      lambda a, s: NamedSharding(mesh, logical_to_spec(a, s.shape, mesh, rules)),
      axes_tree, shapes_tree, is_leaf=_is_axes)


def _path_names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    name = getattr(k, "key", None) or getattr(k, "name", None)
    if isinstance(name, str):
      out.append(name)
  return tuple(out)


def state_specs(state_shapes, param_axes_tree, mesh, rules=DEFAULT_RULES):
  """PartitionSpecs for a train state: every leaf whose path ends with a
  parameter's path and has its shape (the parameters, Adam's moments) gets
  that parameter's logical axes; any other leaf is split on 'agent' along its
  leading axis (per-agent counters) or replicated (scalars). `mesh` may be
  abstract (inside jit)."""
  by_path = {}
  for path, axes in jax.tree_util.tree_flatten_with_path(param_axes_tree, is_leaf=_is_axes)[0]:
    by_path[_path_names(path)] = axes

  def one(path, leaf):
    names = _path_names(path)
    for n in range(len(names)):
      axes = by_path.get(names[n:])
      if axes is not None and len(axes) == len(leaf.shape):
        return logical_to_spec(axes, leaf.shape, mesh, rules)
    axes = ("agent",) + (None,) * (len(leaf.shape) - 1) if leaf.shape else ()
    return logical_to_spec(axes, leaf.shape, mesh, rules)

  return jax.tree_util.tree_map_with_path(one, state_shapes)


def state_shardings(state_shapes, param_axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings of `state_specs`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      state_specs(state_shapes, param_axes_tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain_state(state, param_axes_tree, rules=None):
  """Inside jit, under a current mesh (`Placement.context`): pin every leaf
  of a train state (or a population) to the rule table's layout, so that a
  step's outputs stay where its inputs were put instead of wherever the
  partitioner finds convenient.
  Without a current mesh it returns `state` unchanged. `rules`: default, the
  tracing placement's (`Placement.tracing`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return state
  specs = state_specs(state, param_axes_tree, mesh, _RULES.get() if rules is None else rules)
  return jax.tree.map(jax.lax.with_sharding_constraint, state, specs)


def _bounded(index: tuple[slice, ...], shape: Sequence[int]) -> tuple[slice, ...]:
  return tuple(slice(*sl.indices(d)) for sl, d in zip(index, shape))


def assemble(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh | None,
             fetch: Callable[[tuple[slice, ...]], np.ndarray], rules=DEFAULT_RULES
             ) -> jax.Array | np.ndarray:
  """A global array placed by the rule table for its logical `axes`, built
  from `fetch(index)`: the host values at `index` (one slice per dimension,
  with explicit bounds and step 1). `fetch` is asked only for the pieces this
  process's devices hold, so a process needs (and sends) only its own rows.
  Without a mesh: `fetch` of the whole array, as is (jit places it)."""
  shape = tuple(shape)
  if mesh is None:
    return fetch(tuple(slice(0, d, 1) for d in shape))
  spec = logical_to_spec(axes, shape, mesh, rules)
  return jax.make_array_from_callback(shape, NamedSharding(mesh, spec),
                                      lambda index: fetch(_bounded(index, shape)))


def constrain(x: jax.Array, axes: Sequence[str | None], rules=None) -> jax.Array:
  """Inside jit, under a current mesh (`Placement.context`): pin an
  activation to the rule table's layout for its logical `axes` (inside
  `vmap(spmd_axis_name=...)` the agent axis is added by vmap). Only the dims the table splits are pinned; the others are
  left to the partitioner (forcing them whole costs memory where a batch
  cannot be split: the CPU compiler's plan for Llama-3-8B on 64 devices grew
  from 34 to 47 GB). Without a current mesh it returns `x` unchanged.
  `rules`: default, the tracing placement's (`Placement.tracing`)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(axes, x.shape, mesh, _RULES.get() if rules is None else rules)
  free = PartitionSpec.UNCONSTRAINED
  return jax.lax.with_sharding_constraint(
      x, PartitionSpec(*(free if s is None else s for s in spec)))


def host_to_global(x: np.ndarray, axes: Sequence[str | None], mesh: Mesh | None,
                   rules=DEFAULT_RULES) -> jax.Array:
  """`assemble` from a host array that every process holds whole: each device
  receives only its own slice (no process sends rows to devices it does not
  own, nor a whole batch to every device)."""
  return assemble(x.shape, axes, mesh, lambda index: x[index], rules)


def addressable_rows(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh | None, *,
                     per: int, along: int, devices=None, rules=DEFAULT_RULES
                     ) -> list[list[tuple[int, int]]]:
  """For each index `i` of dimension `per`, the disjoint sorted intervals
  [lo, hi) of dimension `along` that this process's devices (or `devices`)
  hold of an array of `shape` placed by the rule table for `axes` ([] where
  they hold none of index `i`). E.g. the rows of each agent's batch that a
  process must build; a mesh whose device order interleaves processes gives
  several intervals. Without a mesh, everything."""
  shape = tuple(shape)
  if mesh is None:
    return [[(0, shape[along])] for _ in range(shape[per])]
  spec = logical_to_spec(axes, shape, mesh, rules)
  mine = set(devices) if devices is not None else None
  held: list[set[tuple[int, int]]] = [set() for _ in range(shape[per])]
  for device, index in NamedSharding(mesh, spec).devices_indices_map(shape).items():
    if (device not in mine) if mine is not None else device.process_index != jax.process_index():
      continue
    index = _bounded(index, shape)
    for i in range(index[per].start, index[per].stop):
      held[i].add((index[along].start, index[along].stop))
  merged = []
  for pieces in held:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(pieces):
      if out and lo <= out[-1][1]:
        out[-1] = (out[-1][0], max(out[-1][1], hi))
      else:
        out.append((lo, hi))
    merged.append(out)
  return merged


def use_mesh(mesh: Mesh):
  """Context that makes `mesh` current (needed by vmap's spmd_axis_name)."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return mesh


# The rule table that `constrain` applies while a program is traced.
_RULES: contextvars.ContextVar = contextvars.ContextVar("rules", default=DEFAULT_RULES)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a population, its batches and its programs live: a mesh (None:
  this process's first device, nothing split) and the rule table mapping
  logical axes onto it (a tuple of pairs or a dict). The population's agent
  axis is split over the mesh axes the table gives the logical axis 'agent'.

  One value for a whole run, hashable, so the jitted programs take it as a
  static argument (`placement=`): their vmap splits the agent axis as the
  table says and their activations follow it. Run them under
  `placement.context()`, which makes the mesh current."""
  mesh: Mesh | None = None
  rules: tuple = DEFAULT_RULES

  def __post_init__(self):
    pairs = self.rules.items() if isinstance(self.rules, Mapping) else self.rules
    object.__setattr__(self, "rules", tuple(
        (name, tuple(t) if isinstance(t, list) else t) for name, t in pairs))

  @property
  def spmd_axis_name(self) -> str | tuple[str, ...] | None:
    """vmap's `spmd_axis_name` for the agent axis (None without a mesh)."""
    return dict(self.rules).get("agent") if self.mesh is not None else None

  def context(self):
    """Make the mesh current (a no-op without one)."""
    return use_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  @contextlib.contextmanager
  def tracing(self):
    """While a jitted program traces: `constrain` uses this placement's rules.
    A placement with a mesh must trace under its own `context()`: otherwise
    `constrain` would find no mesh and silently pin nothing."""
    if self.mesh is not None:
      current = jax.sharding.get_abstract_mesh()
      if current.empty or dict(current.shape) != dict(self.mesh.shape):
        raise MeshError(f"a program placed on the mesh {dict(self.mesh.shape)} is traced "
                        f"under {'no mesh' if current.empty else dict(current.shape)}: "
                        "call it under placement.context()")
    token = _RULES.set(self.rules)
    try:
      yield
    finally:
      _RULES.reset(token)

  def _mesh(self) -> Mesh:
    if self.mesh is None:
      raise MeshError("this placement has no mesh (LOCAL): there are no shardings to give")
    return self.mesh

  def spec(self, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    return logical_to_spec(axes, shape, self._mesh(), self.rules)

  def shardings(self, axes_tree, shapes_tree):
    """NamedShardings of every leaf (the mesh is required)."""
    return shardings(axes_tree, shapes_tree, self._mesh(), self.rules)

  def state_shardings(self, state_shapes, param_axes_tree):
    return state_shardings(state_shapes, param_axes_tree, self._mesh(), self.rules)

  def put(self, x: np.ndarray, axes: Sequence[str | None]):
    """`host_to_global`: a host array every process holds whole, placed."""
    return host_to_global(x, axes, self.mesh, self.rules)

  def assemble(self, shape, axes, fetch):
    return assemble(shape, axes, self.mesh, fetch, self.rules)

  def rows(self, shape, axes, *, per: int, along: int, devices=None):
    """`addressable_rows` of an array placed here."""
    return addressable_rows(shape, axes, self.mesh, per=per, along=along, devices=devices,
                            rules=self.rules)


LOCAL = Placement()  # no mesh: one device, the agent axis not split

