"""Shared assertions for statemap's tests."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import statemap


def assert_tree_allclose(actual: Any, expected: Any, rtol: float = 1e-6, atol: float = 1e-6) -> None:
    """Same tree structure, and every leaf close."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        if jax.dtypes.issubdtype(getattr(a, "dtype", None) or np.asarray(a).dtype, jax.dtypes.prng_key):
            a, e = jax.random.key_data(a), jax.random.key_data(e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def assert_concrete(states: Iterable[statemap.State]) -> None:
    """No state holds a tracer."""
    for state in states:
        for leaf in jax.tree.leaves(state.value):
            assert not isinstance(leaf, jax.core.Tracer), f"{state!r} holds a tracer"


def snapshot(states: Iterable[statemap.State]) -> list[tuple[statemap.State, Any]]:
    """Remember the values of ``states``."""
    return [(s, s.value) for s in states]


def assert_unchanged(saved: list[tuple[statemap.State, Any]]) -> None:
    """Every state holds exactly (the same object as) what ``snapshot`` saw, and is concrete."""
    for state, value in saved:
        assert state.value is value, f"{state!r} changed"
    assert_concrete(s for s, _ in saved)


def key_bits(key: Any) -> np.ndarray:
    """The raw uint32 bits of a typed or legacy key (or a stack of them)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key)


def assert_keys_equal(actual: Any, expected: Any) -> None:
    """Same kind of key (typed or legacy), same shape, and the same bits exactly."""
    typed = jax.dtypes.issubdtype(actual.dtype, jax.dtypes.prng_key)
    assert typed == jax.dtypes.issubdtype(expected.dtype, jax.dtypes.prng_key), (actual, expected)
    np.testing.assert_array_equal(key_bits(actual), key_bits(expected))


def lane_keys(parent: Any, n: int) -> tuple[Any, Any]:
    """Oracle for per-lane keys: ``(advanced parent, stacked keys of lanes 0..n-1)``.

    A mapped call splits the parent once, ``new, base = split(parent)``, keeps
    ``new`` as the state's next value, and hands lane i ``fold_in(base, i)``.
    """
    new, base = jax.random.split(parent)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jax.numpy.arange(n))
    return new, keys


def arr(*shape: int, start: float = 0.0) -> jax.Array:
    """A small float32 array with distinct entries."""
    return jnp.asarray((np.arange(np.prod(shape, dtype=int)).reshape(shape) + start) / 10, dtype=jnp.float32)


def counted(fn: Callable[..., Any]) -> Any:
    """Wrap ``fn`` so that ``wrapper.runs`` counts its Python runs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wrapper.runs += 1  # type: ignore[attr-defined]
        return fn(*args, **kwargs)

    wrapper.runs = 0  # type: ignore[attr-defined]
    return wrapper


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiles() -> Iterator[list[str]]:
    """Collect the names of the functions XLA compiles inside the block."""
    names: list[str] = []

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event == BACKEND_COMPILE:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


class SequentialMapping(statemap.StatefulMapping):
    """A mapping written only through the hooks: lanes one after another with ``jax.lax.map``.

    No collectives (``lax.map`` has no axis name). Its programs do not say that they
    refuse other input shapes (``programs_check_inputs``), so the engine checks.
    """

    api = "SequentialMapping"

    def _map(self, spec):
        def run(*inputs):
            def one(i):
                picked = [x if a is None else jnp.take(x, i, axis=a) for x, a in zip(inputs, spec.in_axes)]
                return spec.lane_fn(i, *picked)

            outs = jax.lax.map(one, jnp.arange(spec.axis_size))
            return [o[0] if a is None else jnp.moveaxis(o, 0, a) for o, a in zip(outs, spec.out_axes)]

        return jax.jit(run)

    def _resolve_axis_size(self, size):
        if size is None:
            raise ValueError(f"{self.api}: nothing gives the axis size; pass `axis_size=n`.")
        return size


TIMEOUT = 60  # seconds for a whole group of threads


def run_threads(target: Callable[[int], Any], n: int, stuck: str = "a thread did not finish") -> None:
    """Run ``target(i)`` in ``n`` threads started together; re-raise the first failure."""
    start = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            start.wait(timeout=TIMEOUT)
            target(i)
        except BaseException as err:  # noqa: BLE001 (reported in the main thread)
            errors.append(err)

    threads = [threading.Thread(target=body, args=(i,), name=f"statemap-test-{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT)
    assert not any(thread.is_alive() for thread in threads), stuck
    if errors:
        raise errors[0]


def run_each(*targets: Callable[[], Any], stuck: str = "a thread did not finish") -> None:
    """Run each of ``targets`` in a thread of its own, as ``run_threads`` does."""
    run_threads(lambda i: targets[i](), len(targets), stuck)
