"""Shared assertions for statemap's tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
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
