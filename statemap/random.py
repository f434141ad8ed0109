"""The module-level default random state and draws from it.

Example:
  >>> import statemap
  >>> statemap.random.seed(0)
  >>> a = statemap.random.normal((2,))
  >>> statemap.random.seed(0)
  >>> bool((statemap.random.normal((2,)) == a).all())
  True
"""

from __future__ import annotations

from typing import Any

import jax

from ._random import RandomState, Shape

__all__ = [
    "DEFAULT",
    "bernoulli",
    "next_key",
    "normal",
    "randint",
    "seed",
    "split_key",
    "uniform",
]

DEFAULT = RandomState(name="statemap.random.DEFAULT")
"""The random state that the module-level draws use."""


def seed(seed_or_key: Any = None) -> None:
    """Reseed ``DEFAULT``; see ``RandomState.seed``."""
    DEFAULT.seed(seed_or_key)


def next_key() -> jax.Array:
    """A fresh key from ``DEFAULT``; see ``RandomState.next_key``."""
    return DEFAULT.next_key()


def split_key(n: int) -> jax.Array:
    """``n`` fresh keys from ``DEFAULT``; see ``RandomState.split_key``."""
    return DEFAULT.split_key(n)


def normal(shape: Shape | None = (), dtype: Any = float) -> jax.Array:
    """Standard normal draws from ``DEFAULT``; see ``RandomState.normal``."""
    return DEFAULT.normal(shape, dtype)


def uniform(shape: Shape | None = (), dtype: Any = float, minval: Any = 0.0, maxval: Any = 1.0) -> jax.Array:
    """Uniform draws from ``DEFAULT``; see ``RandomState.uniform``."""
    return DEFAULT.uniform(shape, dtype, minval, maxval)


def randint(shape: Shape | None, minval: Any, maxval: Any, dtype: Any = int) -> jax.Array:
    """Integer draws from ``DEFAULT``; see ``RandomState.randint``."""
    return DEFAULT.randint(shape, minval, maxval, dtype)


def bernoulli(shape: Shape | None = (), p: Any = 0.5) -> jax.Array:
    """Boolean draws from ``DEFAULT``; see ``RandomState.bernoulli``."""
    return DEFAULT.bernoulli(shape, p)
