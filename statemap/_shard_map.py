"""ShardMapMapping and shard_map: one lane per device along a mesh axis, on ``jax.shard_map``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding

from ._axes import partition_spec
from ._call import Call
from ._catalogue import LaneRecorder, SizeSources
from ._mapping import KeptCopies, MapSpec, StatefulMapping, all_in_place, refuse_deleted, shardings_of
from ._plan import Plan
from ._planner import LaneOutputs
from ._policy import PolicyName
from ._processes import WeakTypes, global_lanes, processes_line
from ._transform import MISSING

__all__ = ["ShardMapMapping", "shard_map"]

F = TypeVar("F", bound=Callable[..., Any])


class ShardMapMapping(StatefulMapping):
    """A stateful ``jax.shard_map`` under ``jax.jit``: one lane per device along ``axis_name``.

    Lanes see what :class:`statemap.PMapMapping`'s lanes see, and lane i gets
    the same key as under ``vmap`` and ``pmap``. States stay on the devices
    between calls: a split state comes back sharded along the mesh axis, a
    broadcast one replicated, so a warm call moves no state through the host.
    Other axes of ``mesh`` are left to JAX (data and model parallelism).
    Build it with :func:`statemap.shard_map`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import statemap
      >>> n = jax.device_count()
      >>> total = statemap.State(jnp.zeros(()), name='total')
      >>> def add(x):
      ...     total.value = total.value + jax.lax.psum(x, 'd')
      ...     return x * 2
      >>> statemap.ShardMapMapping(add, 'd')(jnp.ones(n)).shape == (n,)
      True
      >>> int(total.value) == n
      True
    """

    api = "statemap.shard_map"
    programs_check_inputs = True
    default_size_origin = "the mesh axis"

    def __init__(
        self,
        fn: Callable[..., Any],
        axis_name: Hashable | None = None,
        *,
        mesh: Mesh | None = None,
        in_axes: Any = 0,
        out_axes: Any = 0,
        static_argnums: int | Sequence[int] = (),
        devices: Sequence[jax.Device] | None = None,
        axis_size: int | None = None,
        donate_argnums: int | Sequence[int] = (),
        state_in_axes: Any = None,
        state_out_axes: Any = None,
        unexpected_out_state_mapping: PolicyName | str = "raise",
    ):
        super().__init__(
            fn,
            in_axes=in_axes,
            out_axes=out_axes,
            axis_name=axis_name,
            axis_size=axis_size,
            state_in_axes=state_in_axes,
            state_out_axes=state_out_axes,
            unexpected_out_state_mapping=unexpected_out_state_mapping,
            static_argnums=static_argnums,
            donate_argnums=donate_argnums,
        )
        self.mesh = _mesh(self.api, mesh, devices, self._lane_axis, axis_name is None)
        self.devices = devices

    def _options(self) -> Hashable:
        return (super()._options(), self.mesh)

    def _map(self, spec: MapSpec) -> Callable[..., Sequence[Any]]:
        name = spec.axis_name

        weak = WeakTypes() if jax.process_count() > 1 else None

        def block(*blocks: Any) -> list[Any]:
            inputs = [b if a is None else jnp.squeeze(b, a) for b, a in zip(blocks, spec.in_axes)]
            if weak is not None:
                inputs = weak.restore(inputs)
            outs = spec.lane_fn(jax.lax.axis_index(name), *inputs)
            return [o if a is None else jnp.expand_dims(o, a) for o, a in zip(outs, spec.out_axes)]

        mapped = jax.shard_map(
            block,
            mesh=self.mesh,
            in_specs=tuple(partition_spec(a, name) for a in spec.in_axes),
            out_specs=[partition_spec(a, name) for a in spec.out_axes],
            axis_names={name},
            # The base has already proved, with vmap's rules, that every
            # output declared replicated is the same on every device.
            check_vma=False,
        )
        program = jax.jit(mapped, donate_argnums=spec.donated)
        if weak is not None:
            return weak.recording(_across_processes(program, self.mesh, spec))
        placed = _Placed([NamedSharding(self.mesh, partition_spec(a, name)) for a in spec.in_axes])
        return lambda *inputs: program(*placed(inputs))

    def _trace(
        self, call: Call, sizes: SizeSources, axis_name: Hashable | None, hint: int | None
    ) -> tuple[Any, LaneRecorder, LaneOutputs]:
        # Trace as jax.shard_map traces its body, under the mesh with the lane
        # axis manual: the equations keep that mesh, which lowering
        # ``axis_index`` on a partly manual mesh (other axes auto) needs.
        mesh = self.mesh.abstract_mesh.update_axis_types({self._lane_axis: AxisType.Manual})
        with jax.sharding.use_abstract_mesh(mesh):
            return super()._trace(call, sizes, axis_name, hint)

    def _resolve_axis_size(self, size: int | None) -> int:
        devices = self.mesh.shape[self._lane_axis]
        if jax.process_count() > 1:
            local = self.mesh.local_mesh.shape[self._lane_axis]
            held = f"the {devices} devices along mesh axis {self._lane_axis!r}"
            return global_lanes(self.api, size, local, devices, held)
        if size is None:
            return devices
        if size != devices:
            raise ValueError(
                f"{self.api}: the mapped axis has size {size}, but mesh axis {self._lane_axis!r} "
                f"has {devices} devices; shard_map runs one lane per device along it. Map an "
                f"axis of size {devices}, or build the mesh with {size} devices along that axis."
            )
        return size

    def _explain_lines(self, plan: Plan) -> list[str]:
        shape = ", ".join(f"{k!r}: {v}" for k, v in self.mesh.shape.items())
        lines = [f"mesh: {{{shape}}}, lanes along {self._lane_axis!r}"]
        if jax.process_count() > 1:
            lines.append(processes_line(self.mesh.local_mesh.shape[self._lane_axis], plan.axis_size))
        return lines


def _across_processes(program: Callable[..., Any], mesh: Mesh, spec: MapSpec) -> Callable[..., Sequence[Any]]:
    """``program`` on each process's local parts: global arrays in, local parts out.

    Under ``jax.distributed`` the compiled program takes and returns global
    arrays; a process passes, and its states keep, only the part on its own
    devices. Both conversions reuse the device buffers.
    """
    name = spec.axis_name
    in_specs = [partition_spec(a, name) for a in spec.in_axes]
    out_specs = [partition_spec(a, name) for a in spec.out_axes]
    placed = _Placed([NamedSharding(mesh.local_mesh, s) for s in in_specs])

    def run(*inputs: Any) -> Sequence[Any]:
        arrays = [x if isinstance(x, jax.Array) else jnp.asarray(x) for x in inputs]  # Python scalars too
        inputs = tuple(multihost_utils.host_local_array_to_global_array(placed(arrays), mesh, in_specs))
        return multihost_utils.global_array_to_host_local_array(list(program(*inputs)), mesh, out_specs)

    return run


class _Placed:
    """Lays inputs out as the program keeps its outputs: sharded on their axis, or replicated.

    Then the first call compiles for the layouts every later call sees (a warm
    second call), and a state another mesh left elsewhere moves here. A state
    only read is never written back, so its copy on the devices is kept for as
    long as its value lives: a warm call does not send it from the host again.
    """

    def __init__(self, shardings: Sequence[NamedSharding]):
        self.shardings = shardings
        # For each input, the sharding object last found equal to its target:
        # a program's outputs carry the same objects call after call, and ``is``
        # costs far less than comparing meshes.
        self.matched: list[Any] = list(shardings)
        self.copies = KeptCopies()

    def __call__(self, inputs: Sequence[Any]) -> Sequence[Any]:
        shardings = shardings_of(inputs)
        if shardings is None:  # numbers, NumPy arrays, tracers: look at each
            return [self.place(i, x) for i, x in enumerate(inputs)]
        if all_in_place(inputs, shardings, self.matched):
            return inputs
        return [
            x if s is m and not x.is_deleted() else self.place(i, x)
            for i, (x, s, m) in enumerate(zip(inputs, shardings, self.matched))
        ]

    def place(self, i: int, x: Any) -> Any:
        kept = self.copies.get(i, x)  # first: a read-only state's copy is looked up every call
        if kept is not None and not x.is_deleted():
            return kept
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            return x
        refuse_deleted("statemap.shard_map", x)
        current, sharding = x.sharding, self.shardings[i]
        if current is self.matched[i] or current == sharding:
            self.matched[i] = current
            return x
        return self.copies.put(i, x, jax.device_put(x, sharding))


def _mesh(api: str, mesh: Mesh | None, devices: Sequence[jax.Device] | None, name: Hashable, unnamed: bool) -> Mesh:
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"{api}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
        if devices is not None:
            raise ValueError(f"{api}: pass `mesh` or `devices`, not both.")
        if name not in mesh.axis_names:
            given = "no `axis_name` was given" if unnamed else f"`axis_name` {name!r} is not an axis of the mesh"
            raise ValueError(
                f"{api}: {given} (axes {mesh.axis_names}). Pass the mesh axis to map over as `axis_name`."
            )
        return mesh
    if devices is not None:
        devices = list(devices)
        if not devices or not all(isinstance(d, jax.Device) for d in devices):
            raise TypeError(f"{api}: `devices` must be a non-empty sequence of jax.Device, got {devices!r}.")
    return Mesh(np.array(devices if devices is not None else jax.devices()), (name,))


@overload
def shard_map(
    fn: F,
    axis_name: Hashable | None = None,
    *,
    mesh: Mesh | None = None,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_argnums: int | Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> ShardMapMapping: ...


@overload
def shard_map(
    fn: Any = MISSING,
    axis_name: Hashable | None = None,
    *,
    mesh: Mesh | None = None,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_argnums: int | Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> Callable[[F], ShardMapMapping]: ...


def shard_map(
    fn: Any = MISSING,
    axis_name: Hashable | None = None,
    *,
    mesh: Mesh | None = None,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_argnums: int | Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> Any:
    """Map a stateful function over the devices of a mesh axis, on ``jax.shard_map``.

    The same rules as :func:`statemap.vmap` apply to states, and the same
    user code gives the same numbers under ``vmap``, ``pmap`` and
    ``shard_map`` for the same seed. Without ``fn``, returns a decorator.

    Args:
      fn: the function to map.
      axis_name: the mesh axis to map over, and the name collectives use.
      mesh: a ``jax.sharding.Mesh`` with an axis ``axis_name`` (other axes
        are left alone); default: a 1-D mesh over ``devices``.
      in_axes: as in ``jax.vmap``.
      out_axes: as in ``jax.vmap``.
      static_argnums: positional arguments that are hashable compile-time constants.
      devices: the devices of the default mesh (default: every device).
      axis_size: the number of lanes when nothing mapped gives it; it must
        equal the size of the mesh axis.
      donate_argnums: positional arguments whose buffers may be reused.
      state_in_axes: as in :func:`statemap.vmap`.
      state_out_axes: as in :func:`statemap.vmap`.
      unexpected_out_state_mapping: as in :func:`statemap.vmap`.

    Returns:
      A ``ShardMapMapping`` (or a decorator making one).

    Raises:
      ValueError, TypeError: for a bad argument, at once.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import statemap
      >>> n = jax.device_count()
      >>> w = statemap.ParamState(jnp.ones(3), name='w')
      >>> @statemap.shard_map(axis_name='devices')
      ... def sgd_step(x):
      ...     grad = jax.lax.pmean(x * w.value, 'devices')
      ...     w.value = w.value - 0.1 * grad
      ...     return grad.sum()
      >>> out = sgd_step(jnp.ones((n, 3)))
      >>> w.value
      Array([0.9, 0.9, 0.9], dtype=float32)
    """
    keywords = dict(
        mesh=mesh,
        in_axes=in_axes,
        out_axes=out_axes,
        static_argnums=static_argnums,
        devices=devices,
        axis_size=axis_size,
        donate_argnums=donate_argnums,
        state_in_axes=state_in_axes,
        state_out_axes=state_out_axes,
        unexpected_out_state_mapping=unexpected_out_state_mapping,
    )
    if fn is MISSING:
        ShardMapMapping(_validate_only, axis_name, **keywords)
        return lambda f: ShardMapMapping(f, axis_name, **keywords)
    return ShardMapMapping(fn, axis_name, **keywords)


def _validate_only(*args: Any) -> None:
    """Stands in for the function when ``shard_map(...)`` checks its arguments before decorating."""
