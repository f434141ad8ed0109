"""PMapMapping and pmap: statemap's stateful ``jax.pmap``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ._axes import partition_spec
from ._mapping import MISSING, KeptCopies, MapSpec, StatefulMapping, all_in_place, refuse_deleted, shardings_of
from ._plan import Plan
from ._policy import PolicyName
from ._processes import WeakTypes, global_lanes, processes_line
from ._transform import validate_only

__all__ = ["PMapMapping", "pmap"]

F = TypeVar("F", bound=Callable[..., Any])


class PMapMapping(StatefulMapping):
    """A stateful ``jax.pmap``: the function runs once per device.

    Build it with :func:`statemap.pmap`, or directly with the same keywords.
    Batched-ness of writes is decided with vmap's rules, so a value that
    differs between devices is never silently replaced by device 0's.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import statemap
      >>> n = jax.local_device_count()
      >>> total = statemap.State(jnp.zeros(()), name='total')
      >>> def add(x):
      ...     total.value = total.value + jax.lax.psum(x, 'd')
      ...     return x + 1
      >>> statemap.PMapMapping(add, axis_name='d')(jnp.ones(n)).shape == (n,)
      True
      >>> int(total.value) == n
      True
    """

    api = "statemap.pmap"
    programs_check_inputs = True
    static_argnums_name = "static_broadcasted_argnums"
    default_size_origin = "the number of devices"

    def __init__(
        self,
        fn: Callable[..., Any],
        axis_name: Hashable | None = None,
        *,
        in_axes: Any = 0,
        out_axes: Any = 0,
        static_broadcasted_argnums: int | Sequence[int] = (),
        devices: Sequence[jax.Device] | None = None,
        backend: str | None = None,
        axis_size: int | None = None,
        donate_argnums: int | Sequence[int] = (),
        global_arg_shapes: Any = None,
        state_in_axes: Any = None,
        state_out_axes: Any = None,
        unexpected_out_state_mapping: PolicyName | str = "raise",
    ):
        if global_arg_shapes is not None:
            raise ValueError(
                f"{self.api}: `global_arg_shapes` is no longer supported by JAX (jax.pmap "
                f"dropped it); remove the argument. Each process passes its local part."
            )
        if devices is not None:
            devices = list(devices)
            if not devices or not all(isinstance(d, jax.Device) for d in devices):
                raise TypeError(f"{self.api}: `devices` must be a non-empty sequence of jax.Device, got {devices!r}.")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"{self.api}: `backend` must be a str such as 'cpu', got {backend!r}.")
        if backend is not None:
            try:
                jax.devices(backend)
            except RuntimeError as err:
                raise ValueError(f"{self.api}: `backend` {backend!r} is not available here: {err}") from None
        super().__init__(
            fn,
            in_axes=in_axes,
            out_axes=out_axes,
            axis_name=axis_name,
            axis_size=axis_size,
            state_in_axes=state_in_axes,
            state_out_axes=state_out_axes,
            unexpected_out_state_mapping=unexpected_out_state_mapping,
            static_argnums=static_broadcasted_argnums,
            donate_argnums=donate_argnums,
        )
        self.devices = devices
        self.backend = backend

    def _options(self) -> Hashable:
        return (super()._options(), None if self.devices is None else tuple(self.devices), self.backend)

    def _map(self, spec: MapSpec) -> Callable[..., Sequence[Any]]:
        devices, backend = self.devices, self.backend  # the program must not keep the mapping alive

        weak = WeakTypes() if jax.process_count(backend) > 1 else None

        def lane(*inputs: Any) -> tuple[Any, ...]:
            if weak is not None:
                inputs = tuple(weak.restore(inputs))
            return tuple(spec.lane_fn(jax.lax.axis_index(spec.axis_name), *inputs))

        def pmapped(fn: Callable[..., Any], in_axes: tuple[int | None, ...], donated: tuple[int, ...]) -> Any:
            return jax.pmap(
                fn,
                axis_name=spec.axis_name,
                in_axes=in_axes,
                out_axes=tuple(spec.out_axes),  # hashable: jax.pmap keys a cache on it across processes
                devices=devices,
                backend=backend,
                donate_argnums=donated,
            )

        lanes = self._local_devices()[: spec.axis_size]
        # Where jax.pmap leaves its outputs: inputs placed there from the first
        # call on compile once, and a state written by one call is in place for the next.
        mesh = Mesh(np.array(lanes), (spec.axis_name,))
        homes = [NamedSharding(mesh, partition_spec(a, spec.axis_name)) for a in spec.in_axes]
        first_device = lanes[0]
        if any(axis is not None for axis in spec.in_axes):
            run = _placing(pmapped(lane, spec.in_axes, spec.donated), spec.in_axes, len(lanes), first_device, homes)
        else:
            # jax.pmap needs a mapped input even with axis_size: give it the lane
            # indices, sharded once so that calls do not copy them to the devices.
            indices = jax.pmap(lambda i: i, devices=devices, backend=backend)(jnp.arange(len(lanes)))
            program = pmapped(lambda _, *inputs: lane(*inputs), (0, *spec.in_axes), tuple(i + 1 for i in spec.donated))
            run = _placing(lambda *inputs: program(indices, *inputs), spec.in_axes, len(lanes), first_device, homes)
        return run if weak is None else weak.recording(run)

    def _local_devices(self) -> list[jax.Device]:
        """The devices of this map that belong to this process (all of them, in one process)."""
        if self.devices is None:
            return jax.local_devices(backend=self.backend)
        here = jax.process_index(self.backend)
        return [d for d in self.devices if d.process_index == here]

    def _resolve_axis_size(self, size: int | None) -> int:
        if jax.process_count(self.backend) > 1:
            return self._global_axis_size(size)
        available = len(self._local_devices())
        if size is None:
            return available
        if size < 1:
            raise ValueError(
                f"{self.api}: the mapped axis has size {size}; pmap needs at least one lane "
                f"(one device) per call. Skip the call for an empty batch, or use statemap.vmap."
            )
        if self.devices is not None and size != available:
            raise ValueError(
                f"{self.api}: the mapped axis has size {size}, but `devices` lists {available} "
                f"devices; pmap runs one lane per device. Map an axis of size {available}, or "
                f"pass {size} devices in `devices`."
            )
        if size > available:
            raise ValueError(
                f"{self.api}: the mapped axis has size {size}, but only {available} devices are "
                f"available; pmap runs one lane per device. Reshape the batch to a leading axis "
                f"of at most {available} (and map the rest with statemap.vmap inside), or start "
                f"JAX with more devices."
            )
        return size

    def _global_axis_size(self, size: int | None) -> int:
        lanes = len(self.devices) if self.devices is not None else jax.device_count(self.backend)
        return global_lanes(self.api, size, len(self._local_devices()), lanes, f"the map's {lanes} devices")

    def _explain_lines(self, plan: Plan) -> list[str]:
        devices = self._local_devices()[: plan.axis_size]
        lines = [f"devices: {', '.join(str(d) for d in devices)}"]
        if jax.process_count(self.backend) > 1:
            lines.append(processes_line(len(devices), plan.axis_size))
        return lines


def _placing(
    program: Callable[..., Sequence[Any]],
    in_axes: Sequence[int | None],
    size: int,
    device: jax.Device,
    homes: Sequence[NamedSharding],
) -> Callable[..., Sequence[Any]]:
    """``program``, first moving the inputs ``jax.pmap`` would reject to where it takes them.

    A state can hold a value an earlier pmap sharded, or one committed to a
    single device, that this pmap cannot take as is (see ``_misplaced``). Each
    call decides from its own inputs' shardings, so an input moved once is not
    copied again once it is in place, and tracers (a call inside another
    transform) pass untouched. The sharding objects of inputs found in place
    are remembered: a program's outputs carry the same objects call after
    call, so a warm call compares identities only.
    """
    in_place: list[Any] = [None] * len(homes)
    copies = KeptCopies()

    def run(*inputs: Any) -> Sequence[Any]:
        shardings = shardings_of(inputs)
        if shardings is not None and all_in_place(inputs, shardings, in_place):
            return program(*inputs)
        if any(_misplaced(x, axis, size) for x, axis in zip(inputs, in_axes)):
            inputs = tuple(_placed(x, axis, size, device) for x, axis in zip(inputs, in_axes))
        inputs = tuple(
            _at_home(x, home, axis, in_place[i], i, copies) for i, (x, home, axis) in enumerate(zip(inputs, homes, in_axes))
        )
        for i, x in enumerate(inputs):
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.committed:
                in_place[i] = x.sharding
        return program(*inputs)

    return run


def _misplaced(x: Any, axis: int | None, size: int) -> bool:
    """Whether ``jax.pmap`` rejects ``x`` as an input on ``axis`` (None: broadcast) of ``size`` lanes.

    It takes any uncommitted array. Committed, a broadcast input must be on one
    device or replicated, and a mapped input split along its mapped axis, one
    slice per device.
    """
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer) or not x.committed:
        return False
    sharding = x.sharding
    if axis is None:
        return len(sharding.device_set) > 1 and not sharding.is_fully_replicated
    one_slice = (*x.shape[:axis], 1, *x.shape[axis + 1 :])
    return len(sharding.device_set) != size or tuple(sharding.shard_shape(x.shape)) != one_slice


def _at_home(x: Any, home: NamedSharding, axis: int | None, known: Any, i: int, copies: KeptCopies) -> Any:
    """Input ``i``, ``x``, where ``jax.pmap`` leaves outputs like it; tracers pass as they are.

    A committed input stays where it is if ``jax.pmap`` takes it there: found
    in place before (its sharding is ``known``), laid out as ``home``, or a
    broadcast one on a single device. One spread over other devices (another
    pmap's lanes, another mesh) or in another order moves: ``jax.pmap`` would
    run on its buffers where they are, and XLA crashes.
    """
    if isinstance(x, jax.core.Tracer):
        return x
    if not isinstance(x, jax.Array):
        return jax.device_put(x, home)  # a NumPy array may change in place: sent every call
    refuse_deleted("statemap.pmap", x)
    if x.committed:
        sharding = x.sharding
        single = axis is None and len(sharding.device_set) == 1
        if sharding is known or single or sharding.is_equivalent_to(home, x.ndim):
            return x
        return jax.device_put(x, home)
    kept = copies.get(i, x)
    return kept if kept is not None else copies.put(i, x, jax.device_put(x, home))


def _placed(x: Any, axis: int | None, size: int, device: jax.Device) -> Any:
    if not _misplaced(x, axis, size):
        return x
    # A broadcast input goes to one device; a mapped one through the host, uncommitted.
    return jax.device_put(x, device) if axis is None else np.asarray(x)


@overload
def pmap(
    fn: F,
    axis_name: Hashable | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_broadcasted_argnums: int | Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
    backend: str | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    global_arg_shapes: Any = None,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> PMapMapping: ...


@overload
def pmap(
    fn: Any = MISSING,
    axis_name: Hashable | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_broadcasted_argnums: int | Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
    backend: str | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    global_arg_shapes: Any = None,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> Callable[[F], PMapMapping]: ...


def pmap(
    fn: Any = MISSING,
    axis_name: Hashable | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_broadcasted_argnums: int | Sequence[int] = (),
    devices: Sequence[jax.Device] | None = None,
    backend: str | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    global_arg_shapes: Any = None,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: PolicyName | str = "raise",
) -> Any:
    """Map a stateful function over devices, like ``jax.pmap``.

    The same rules as :func:`statemap.vmap` apply to states (and lane i gets
    the same key under both); the axis size defaults to the number of devices
    and may not exceed it. Without ``fn``, returns a decorator.

    Args:
      fn: the function to map.
      axis_name: the name collectives use (second positional, as in ``jax.pmap``).
      in_axes: as in ``jax.pmap``; negative axes count from the end.
      out_axes: as in ``jax.pmap``; None only for values equal on every device.
      static_broadcasted_argnums: positional arguments that are compile-time
        constants (hashable), passed unchanged to every device.
      devices: the devices to run on; the axis size must equal their number.
      backend: as in ``jax.pmap``, e.g. ``'cpu'``.
      axis_size: the number of lanes when no argument or state is mapped.
      donate_argnums: positional arguments whose buffers may be reused.
      global_arg_shapes: accepted for source compatibility only; JAX dropped
        it, so anything but None is a ``ValueError``.
      state_in_axes: as in :func:`statemap.vmap`.
      state_out_axes: as in :func:`statemap.vmap`.
      unexpected_out_state_mapping: as in :func:`statemap.vmap`.

    Returns:
      A ``PMapMapping`` (or a decorator making one).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import statemap
      >>> n = jax.local_device_count()
      >>> w = statemap.ParamState(jnp.ones(3), name='w')
      >>> @statemap.pmap(axis_name='devices')
      ... def sgd_step(x):
      ...     grad = jax.lax.pmean(x * w.value, 'devices')
      ...     w.value = w.value - 0.1 * grad
      ...     return grad.sum()
      >>> out = sgd_step(jnp.ones((n, 3)))
      >>> w.value
      Array([0.9, 0.9, 0.9], dtype=float32)

      brainstate's ``pmap2`` example, with one row of weights per device:

      >>> from statemap.filters import OfType
      >>> weights = statemap.ParamState(jnp.ones((n, 4)))
      >>> @statemap.pmap2(
      ...     axis_name='devices',
      ...     in_axes=0,
      ...     out_axes=0,
      ...     state_in_axes={0: OfType(statemap.ParamState)},
      ...     state_out_axes={0: OfType(statemap.ParamState)},
      ... )
      ... def update(delta):
      ...     weights.value = weights.value + delta
      ...     return weights.value
      >>> deltas = jnp.arange(n * 4.0).reshape(n, 4)
      >>> updated = update(deltas)
      >>> updated.shape == (n, 4), bool((weights.value == 1 + deltas).all())
      (True, True)
    """
    keywords = dict(
        in_axes=in_axes,
        out_axes=out_axes,
        static_broadcasted_argnums=static_broadcasted_argnums,
        devices=devices,
        backend=backend,
        axis_size=axis_size,
        donate_argnums=donate_argnums,
        global_arg_shapes=global_arg_shapes,
        state_in_axes=state_in_axes,
        state_out_axes=state_out_axes,
        unexpected_out_state_mapping=unexpected_out_state_mapping,
    )
    if fn is MISSING:
        PMapMapping(validate_only, axis_name, **keywords)
        return lambda f: PMapMapping(f, axis_name, **keywords)
    return PMapMapping(fn, axis_name, **keywords)

