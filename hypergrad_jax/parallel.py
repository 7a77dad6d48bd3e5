"""Multi-device and multi-process execution: meshes, data and population parallelism.

Everything here is ``jax.shard_map`` / ``NamedSharding`` (no legacy ``pmap``), so the same
code runs on one device, on several devices of one process, and on the global devices of
several processes started with :func:`initialize`.

* :func:`make_mesh`: a 1-D mesh over the first ``num_devices`` (global) devices.
* :func:`data_parallel`: a :class:`~hypergrad_jax.BilevelProblem` whose losses split the
  batch across a mesh axis and average the shard losses (``pmean``). Every estimator, every
  transform (``grad``, ``jvp``, HVPs, ``vmap``) and jittable samplers work through it, and
  the hypergradient equals the single-device one up to summation order.
* :func:`shard_batch` / :func:`replicate`: place data on the mesh (``NamedSharding``).
* :func:`population_map`: ``fn(hparams, *args)`` mapped over a leading population axis of
  ``hparams``, members split across a mesh axis (``shard_map`` over the axis, ``vmap``
  inside each device).
* :func:`initialize`: multi-process start (``jax.distributed``, gloo collectives on CPU).

Axis types. ``jax.make_mesh`` in JAX 0.10 defaults to ``AxisType.Explicit`` axes, with which
``shard_map``'s ``in_specs`` must match the shardings carried in the inputs' types: an
unsharded batch, or one a sampler gathers inside ``jit``, is rejected (``in_specs ...
P('data', None) does not match the specs of the input: P(None, None)``), and gathers from an
explicitly sharded array need an ``out_sharding``. :func:`make_mesh` therefore builds
``AxisType.Auto`` axes, where ``in_specs`` are a placement request and XLA moves data as
needed: any batch (plain, placed with :func:`shard_batch`, or drawn by a sampler) is
accepted. Meshes with ``Explicit`` axes are still supported: :func:`data_parallel` and
:func:`population_map` ``jax.sharding.reshard`` their inputs to the ``in_specs`` first
(their outputs then carry the explicit mesh in their type: JAX asks for ``jax.set_mesh``
around eager code that mixes them, as for any explicitly sharded array).

Importing: ``from hypergrad_jax import parallel``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from hypergrad_jax.problem import BilevelProblem

PyTree = Any

ENV_COORDINATOR = "HYPERGRAD_COORDINATOR"
ENV_NUM_PROCESSES = "HYPERGRAD_NUM_PROCESSES"
ENV_PROCESS_ID = "HYPERGRAD_PROCESS_ID"
ENV_LOCAL_DEVICE_COUNT = "HYPERGRAD_LOCAL_DEVICE_COUNT"


# --------------------------------------------------------------------------- meshes


def make_mesh(
    num_devices: int | None = None,
    axis_name: str = "data",
    *,
    axis_type: AxisType = AxisType.Auto,
) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices of ``jax.devices()``.

    ``jax.devices()`` lists the global devices, so after :func:`initialize` the mesh spans
    every process (the default takes all of them).

    Args:
      num_devices: how many devices (default: all).
      axis_name: the mesh axis name used by :func:`data_parallel` / :func:`population_map`.
      axis_type: ``AxisType.Auto`` (default: ``shard_map`` accepts inputs of any sharding,
        see the module docstring) or ``AxisType.Explicit`` (JAX's default).

    Raises:
      ValueError: ``num_devices`` is not a positive int or exceeds the device count.
    """
    available = jax.device_count()
    if num_devices is None:
        num_devices = available
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ValueError(f"num_devices: expected a positive int or None, got {num_devices!r}")
    if num_devices > available:
        raise ValueError(
            f"num_devices: asked for {num_devices} devices but only {available} exist "
            f"({jax.default_backend()} backend, {jax.process_count()} process(es)). On CPU, "
            "set XLA_FLAGS=--xla_force_host_platform_device_count=N (or "
            "jax.config.update('jax_num_cpu_devices', N)) before JAX starts."
        )
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"axis_name: expected a non-empty str, got {axis_name!r}")
    if not isinstance(axis_type, AxisType):
        raise TypeError(f"axis_type: expected a jax.sharding.AxisType, got {axis_type!r}")
    return jax.make_mesh(
        (num_devices,),
        (axis_name,),
        axis_types=(axis_type,),
        devices=jax.devices()[:num_devices],
    )


def _axis_size(mesh: Mesh, axis_name: str, arg: str = "mesh") -> int:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{arg}: expected a jax.sharding.Mesh (e.g. hg.parallel.make_mesh()), "
            f"got {type(mesh).__name__}"
        )
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name: {axis_name!r} is not an axis of {arg}, whose axes are "
            f"{mesh.axis_names}; pass axis_name=... or build the mesh with that name"
        )
    return mesh.shape[axis_name]


def _is_explicit(mesh, axis_name: str) -> bool:
    return dict(zip(mesh.axis_names, mesh.axis_types))[axis_name] == AxisType.Explicit


def _mesh_in_context(mesh: Mesh):
    """The mesh to hand to ``shard_map``: ``mesh`` itself, or, inside another ``shard_map``
    over the same devices (e.g. :func:`data_parallel` inside :func:`population_map` on a
    2-D mesh), the context's abstract mesh, whose outer axes are already ``Manual``
    (``shard_map`` requires the two to match)."""
    context = jax.sharding.get_abstract_mesh()
    if context.empty or context == mesh.abstract_mesh:
        return mesh
    if context.axis_names == mesh.axis_names and context.axis_sizes == mesh.axis_sizes:
        return context
    raise ValueError(
        f"mesh: called inside a computation over the mesh {context}, which differs from "
        f"the mesh given here {mesh}; use the same mesh (axes and sizes) for nested maps"
    )


def _reshard(tree: PyTree, mesh: Mesh, spec: P) -> PyTree:
    """On ``Explicit`` axes, gives ``tree`` the sharding ``spec`` in its type (a no-op if it
    has it), so that ``shard_map``'s ``in_specs`` match the inputs."""
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda x: jax.sharding.reshard(x, sharding), tree)


def _leading_size(tree: PyTree, num_shards: int, axis_name: str, name: str, what: str) -> int:
    """The common leading-axis size of every leaf of ``tree``, checked divisible by
    ``num_shards``; errors name the leaf."""
    sizes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape = getattr(leaf, "shape", None)
        if shape is None:
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)}: expected an array, got {type(leaf).__name__}"
            )
        if len(shape) == 0:
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)}: a scalar has no leading {what} axis to "
                f"split across the {num_shards} devices of mesh axis {axis_name!r}; every "
                f"leaf needs a leading {what} axis"
            )
        sizes[jax.tree_util.keystr(path) or "(root)"] = shape[0]
    if not sizes:
        raise ValueError(f"{name}: has no array leaves; expected arrays with a leading {what} axis")
    if len(set(sizes.values())) > 1:
        raise ValueError(
            f"{name}: every leaf must have the same leading ({what}) size; got {sizes}"
        )
    size = next(iter(sizes.values()))
    unit = "members" if what == "population" else "rows"
    if size % num_shards:
        raise ValueError(
            f"{name}: {what} size {size} is not divisible by the {num_shards} devices of mesh "
            f"axis {axis_name!r}; every device must get the same number of {unit} (use a "
            f"multiple of {num_shards}, e.g. {size - size % num_shards or num_shards})"
        )
    return size


# --------------------------------------------------------------------------- data parallel


@dataclasses.dataclass(frozen=True)
class DataParallelLoss:
    """``(params, hparams, batch) -> pmean over shards of loss(params, hparams, shard)``.

    A frozen dataclass (hashed by ``(loss, mesh, axis_name)``) rather than a closure, so
    wrapping the same loss twice gives equal problems and ``hg.hypergradient``'s ``jit``
    cache is hit.
    """

    loss: Callable
    mesh: Mesh
    axis_name: str

    def __call__(self, params, hparams, batch):
        n = self.mesh.shape[self.axis_name]
        _leading_size(batch, n, self.axis_name, "batch", "batch")
        mesh = _mesh_in_context(self.mesh)
        if _is_explicit(mesh, self.axis_name):
            params, hparams = _reshard((params, hparams), self.mesh, P())
            batch = _reshard(batch, self.mesh, P(self.axis_name))
        # check_vma=False: with it on, a user loss that runs a lax.scan/fori_loop over its
        # shard (carry initialised from a constant) fails with a "manual axis types do not
        # match" error unless the user adds lax.pcast. Gradients, jvps and HVPs through
        # pmean with replicated params are exact either way (tests/test_parallel.py).
        sharded = jax.shard_map(
            self._shard_loss,
            mesh=mesh,
            in_specs=(P(), P(), P(self.axis_name)),
            out_specs=P(),
            axis_names=frozenset({self.axis_name}),
            check_vma=False,
        )
        return sharded(params, hparams, batch)

    def _shard_loss(self, params, hparams, batch):
        return jax.lax.pmean(self.loss(params, hparams, batch), self.axis_name)


def data_parallel(
    problem: BilevelProblem,
    mesh: Mesh,
    axis_name: str = "data",
    *,
    inner: bool = True,
    outer: bool = True,
) -> BilevelProblem:
    """``problem`` with losses computed data-parallel across mesh axis ``axis_name``.

    Each wrapped loss splits the leading (batch) axis of every batch leaf into ``n`` equal
    shards (``n = mesh.shape[axis_name]``), evaluates the user's loss on each shard with
    ``jax.shard_map`` (``params`` and ``hparams`` replicated) and averages:

        L(θ, λ; B) = (1/n) Σ_k loss(θ, λ; B_k),   |B_k| = |B| / n.

    Assumption: the loss is a mean over examples plus terms that do not depend on the
    batch (e.g. a penalty on θ or λ). Then the mean of equal-size shard means is the global
    mean, so ``L`` equals ``loss(θ, λ; B)`` and so do its gradients, HVPs, forward- and
    reverse-mode derivatives and therefore every estimator's hypergradient (``Unrolled``,
    ``Forward``, ``Implicit``, ``Greedy``), up to floating-point summation order (~1e-15
    relative per loss in float64). Losses that couple examples across the batch (batch
    statistics, a median, a sum instead of a mean) are not equal under this split.

    Works with a full batch or a jittable sampler ``(key, step) -> batch`` as inner data:
    the split happens inside the loss, on whatever batch the step sees. Batches may be
    plain arrays or placed with :func:`shard_batch` (which saves the transfer). Supports
    ``jit``, ``grad``, ``jvp``/``jacfwd``, ``hessian``, ``vmap``.

    Args:
      problem: the single-device :class:`~hypergrad_jax.BilevelProblem`.
      mesh: a mesh with an axis ``axis_name`` (:func:`make_mesh`); other axes of a
        multi-axis mesh are left to the compiler.
      axis_name: the mesh axis that splits the batch.
      inner, outer: which losses to parallelise (e.g. ``outer=False`` for a small
        validation set whose size is not a multiple of ``n``).

    Returns:
      A :class:`~hypergrad_jax.BilevelProblem`; its losses raise ``ValueError`` at trace
      time when a batch leaf has no leading axis, leaves disagree on the batch size, or the
      batch size is not divisible by ``n``.
    """
    if not isinstance(problem, BilevelProblem):
        raise TypeError(f"problem: expected a BilevelProblem, got {type(problem).__name__}")
    _axis_size(mesh, axis_name)
    wrap = lambda loss, on: DataParallelLoss(loss, mesh, axis_name) if on else loss  # noqa: E731
    return BilevelProblem(wrap(problem.inner_loss, inner), wrap(problem.outer_loss, outer))


def shard_batch(
    batch: PyTree, mesh: Mesh, axis_name: str = "data", *, process_local: bool = False
) -> PyTree:
    """Places every leaf of ``batch`` with ``NamedSharding(mesh, P(axis_name))``: its
    leading axis split into equal contiguous blocks, one per device along ``axis_name``.

    Args:
      batch: pytree of arrays sharing a leading batch size divisible by the axis size.
        With several processes, every process passes the same global batch (JAX checks
        that the values agree), unless ``process_local``.
      mesh, axis_name: as in :func:`data_parallel`.
      process_local: each process passes only its own rows (its local batch); the global
        batch is their concatenation in process order
        (``jax.make_array_from_process_local_data``).

    Returns:
      ``batch`` as global ``jax.Array``s.
    """
    n = _axis_size(mesh, axis_name)
    sharding = NamedSharding(mesh, P(axis_name))
    if process_local:
        local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        _leading_size(batch, max(local, 1), axis_name, "batch", "process-local batch")
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
    _leading_size(batch, n, axis_name, "batch", "batch")
    return jax.device_put(batch, sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf of ``tree`` on all devices of ``mesh`` (``NamedSharding(mesh,
    P())``). With several processes each passes the same values; this makes them global
    arrays, which ``jit`` needs for non-addressable devices."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh: expected a jax.sharding.Mesh, got {type(mesh).__name__}")
    return jax.device_put(tree, NamedSharding(mesh, P()))


# --------------------------------------------------------------------------- populations


def population_map(
    fn: Callable,
    mesh: Mesh,
    axis_name: str = "population",
    *,
    args_axes: int | None | Sequence = None,
) -> Callable:
    """``fn(hparams, *args) -> out`` mapped over a leading population axis of ``hparams``,
    population members split across mesh axis ``axis_name``.

    ``population_map(fn, mesh)(H, *args)`` equals ``jax.vmap(fn, (0, *args_axes))(H,
    *args)``: output leaf ``i`` along the leading axis is ``fn`` of member ``i``. With ``n``
    devices along ``axis_name`` and population size ``M`` (a multiple of ``n``), device
    ``k`` runs ``jax.vmap(fn)`` over members ``k·M/n .. (k+1)·M/n − 1``; outputs come back
    sharded ``P(axis_name)`` along their leading axis.

    Why ``shard_map`` with ``vmap`` inside rather than ``jit`` with ``NamedSharding`` in and
    out: members are independent, and ``shard_map`` guarantees that each device only runs
    its own members, with no collective the partitioner might insert. In particular a
    ``while_loop`` under ``vmap`` (a linear solve of ``Implicit``, a convergence test)
    stops when the members *on that device* are done instead of synchronising the
    predicate across all devices every iteration. Composes with :func:`data_parallel` on
    a 2-D mesh (``("population", "data")``): members split over one axis, each member's
    batches over the other.

    Args:
      fn: ``(hparams, *args) -> pytree of arrays``; e.g. a hypergradient or an outer step.
        Values it closes over (data, the problem, the estimator) are shared by all
        members; ``hparams`` and ``args`` must be pytrees of arrays (they are traced).
      mesh: a mesh with an axis ``axis_name`` (``make_mesh(axis_name="population")``).
      axis_name: the mesh axis that splits the population.
      args_axes: how ``*args`` are mapped: ``None`` (default) shares every argument with
        all members (replicated), ``0`` maps every argument along its leading axis (per
        member), or a sequence with one entry per argument, each ``0``/``None`` or a pytree
        prefix of them.

    Returns:
      The mapped function (jitted; one compilation per input shape); supports ``grad``
      with respect to the population and nesting inside other transforms. It raises
      ``ValueError`` when the population size is not divisible by ``n`` or the mapped
      leaves disagree on it.
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a callable (hparams, *args) -> out, got {fn!r}")
    n = _axis_size(mesh, axis_name)
    spec_of = lambda a: P(axis_name) if a == 0 else P()  # noqa: E731

    def mapped(hparams, *args):
        axes = _args_axes(args_axes, len(args))
        members = [hparams]
        for arg, ax in zip(args, axes):
            members += [
                sub
                for sub, a in zip(_prefix_leaves(ax, arg), jax.tree.leaves(ax, is_leaf=_is_none))
                if a == 0
            ]
        _leading_size(members, n, axis_name, "hparams (and per-member args)", "population")
        in_specs = (P(axis_name), *(jax.tree.map(spec_of, ax, is_leaf=_is_none) for ax in axes))
        inputs = (hparams, *args)
        context_mesh = _mesh_in_context(mesh)
        if _is_explicit(context_mesh, axis_name):
            inputs = tuple(
                _reshard_prefix(x, spec, mesh) for x, spec in zip(inputs, in_specs, strict=True)
            )
        body = jax.vmap(fn, in_axes=(0, *axes))
        # check_vma=False: fn typically scans (the inner run) with a carry started from
        # shared values (params0) and updated with per-member ones, which vma checking
        # rejects; members never communicate, so there is nothing for it to check.
        sharded = jax.shard_map(
            body,
            mesh=context_mesh,
            in_specs=in_specs,
            out_specs=P(axis_name),
            axis_names=frozenset({axis_name}),
            check_vma=False,
        )
        return sharded(*inputs)

    return jax.jit(mapped)


def _is_none(x) -> bool:
    return x is None


def _args_axes(args_axes, num_args: int) -> tuple:
    if args_axes is None or args_axes == 0:
        axes = (args_axes,) * num_args
    elif isinstance(args_axes, (tuple, list)):
        axes = tuple(args_axes)
        if len(axes) != num_args:
            raise ValueError(
                f"args_axes: has {len(axes)} entries but the mapped function was called with "
                f"{num_args} argument(s) after hparams; give one 0/None entry per argument"
            )
    else:
        raise ValueError(
            f"args_axes: expected None, 0 or a sequence of 0/None (one per argument), got "
            f"{args_axes!r}"
        )
    for ax in axes:
        for a in jax.tree.leaves(ax, is_leaf=_is_none):
            if a is not None and (isinstance(a, bool) or a != 0):
                raise ValueError(
                    f"args_axes: entries must be 0 (per member) or None (shared); got {a!r}"
                )
    return axes


def _prefix_leaves(prefix, tree) -> list:
    """The subtrees of ``tree`` at the leaves of its prefix ``prefix``."""
    return jax.tree_util.tree_structure(prefix, is_leaf=_is_none).flatten_up_to(tree)


def _reshard_prefix(tree, spec_prefix, mesh):
    specs = jax.tree_util.tree_structure(spec_prefix, is_leaf=lambda s: isinstance(s, P))
    subtrees = specs.flatten_up_to(tree)
    spec_leaves = jax.tree.leaves(spec_prefix, is_leaf=lambda s: isinstance(s, P))
    return specs.unflatten(
        [_reshard(sub, mesh, spec) for sub, spec in zip(subtrees, spec_leaves, strict=True)]
    )


# --------------------------------------------------------------------------- multi-process


class ProcessInfo(NamedTuple):
    """Where this process stands after :func:`initialize`."""

    process_index: int  # this process, 0 .. process_count - 1
    process_count: int  # number of processes
    local_device_count: int  # devices addressable by this process
    device_count: int  # global devices (all processes)


def _env_int(value, name: str, env: str, minimum: int) -> int | None:
    if value is None:
        raw = os.environ.get(env)
        if raw is None or raw.strip() == "":
            return None
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(
                f"{name}: environment variable {env}={raw!r} is not an integer"
            ) from None
        if value < minimum:
            raise ValueError(f"{name}: environment variable {env}={raw!r} must be >= {minimum}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _check_address(address, from_env: bool) -> str:
    where = f"environment variable {ENV_COORDINATOR}=" if from_env else ""
    host, sep, port = str(address).rpartition(":")
    if not isinstance(address, str) or not sep or not host or not port.isdigit():
        raise ValueError(
            f"coordinator_address: {where}{address!r} is not of the form 'host:port' "
            "(e.g. '127.0.0.1:12355')"
        )
    if not 0 < int(port) < 65536:
        raise ValueError(
            f"coordinator_address: {where}{address!r} has port {port}; expected 1..65535"
        )
    return address


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
) -> ProcessInfo:
    """Starts multi-process JAX (``jax.distributed``) so that meshes span every process.

    Call it first thing in every process, before any JAX computation. Missing arguments
    are read from the environment: ``HYPERGRAD_COORDINATOR`` (``host:port`` of process 0),
    ``HYPERGRAD_NUM_PROCESSES``, ``HYPERGRAD_PROCESS_ID``, ``HYPERGRAD_LOCAL_DEVICE_COUNT``.
    With ``num_processes`` unset or 1 it starts nothing (single-process runs need no
    coordinator). Every process then runs the same program (SPMD): the same
    :func:`make_mesh`, :func:`data_parallel`, ``hg.hypergradient`` calls, with global
    arrays from :func:`shard_batch`/:func:`replicate` or identical host values.

    CPU collectives: before ``jax.distributed.initialize`` it selects gloo
    (``jax_cpu_collectives_implementation="gloo"``) unless another implementation (e.g.
    ``"mpi"``) was chosen; without cross-process collectives on CPU, ``psum``/``pmean``
    over devices of several processes cannot run. The setting only concerns the CPU
    client, so it is harmless on accelerators.

    Args:
      coordinator_address: ``"host:port"`` of process 0; required with several processes.
      num_processes: number of processes (>= 1).
      process_id: this process's index in ``0 .. num_processes - 1``.
      local_device_count: CPU only: how many CPU devices this process exposes
        (``jax_num_cpu_devices``; must be set before JAX starts its backend).

    Returns:
      A :class:`ProcessInfo`.

    Raises:
      ValueError: a value (argument or environment variable) is malformed or missing.
      RuntimeError: JAX already started its backend, or distributed JAX was already
        initialized with a different process count.
    """
    addr_from_env = coordinator_address is None
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR) or None
    num_processes = _env_int(num_processes, "num_processes", ENV_NUM_PROCESSES, 1)
    process_id = _env_int(process_id, "process_id", ENV_PROCESS_ID, 0)
    local_device_count = _env_int(
        local_device_count, "local_device_count", ENV_LOCAL_DEVICE_COUNT, 1
    )
    multi = num_processes is not None and num_processes > 1
    if multi:
        if coordinator_address is None:
            raise ValueError(
                f"coordinator_address: required with num_processes={num_processes}; pass it "
                f"or set {ENV_COORDINATOR}=host:port (process 0's address)"
            )
        _check_address(coordinator_address, addr_from_env)
        if process_id is None:
            raise ValueError(
                f"process_id: required with num_processes={num_processes}; pass it or set "
                f"{ENV_PROCESS_ID}"
            )
    if process_id is not None and process_id >= (num_processes or 1):
        raise ValueError(
            f"process_id: {process_id} is out of range for num_processes={num_processes or 1} "
            f"(expected 0 .. {(num_processes or 1) - 1})"
        )

    if local_device_count is not None:
        try:
            jax.config.update("jax_num_cpu_devices", local_device_count)
        except RuntimeError as e:
            raise RuntimeError(
                f"local_device_count={local_device_count}: JAX has already started its "
                f"backend with {jax.local_device_count()} local device(s); call initialize "
                "before any JAX computation"
            ) from e
    if multi:
        if jax.distributed.is_initialized():
            if jax.process_count() != num_processes:
                raise RuntimeError(
                    f"num_processes: distributed JAX is already initialized with "
                    f"{jax.process_count()} processes, not {num_processes}"
                )
        else:
            if jax.config.jax_cpu_collectives_implementation in (None, "gloo"):
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            try:
                jax.distributed.initialize(
                    coordinator_address=coordinator_address,
                    num_processes=num_processes,
                    process_id=process_id,
                )
            except RuntimeError as e:
                raise RuntimeError(
                    f"initialize(num_processes={num_processes}, process_id={process_id}): {e}"
                ) from e
    return ProcessInfo(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        local_device_count=jax.local_device_count(),
        device_count=jax.device_count(),
    )


__all__ = [
    "DataParallelLoss",
    "ProcessInfo",
    "data_parallel",
    "initialize",
    "make_mesh",
    "population_map",
    "replicate",
    "shard_batch",
]
