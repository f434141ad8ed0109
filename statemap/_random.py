"""RandomState: a state holding a JAX PRNG key."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._jax_internals import default_prng_impl
from ._state import State

__all__ = ["RandomState", "is_key", "to_key"]

Shape = int | Sequence[int]


def is_key(value: Any) -> bool:
    """Whether ``value`` is a typed key or a legacy key (raw ``uint32`` words of the default implementation)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return np.shape(value) == ()
    return dtype == jnp.uint32 and np.shape(value) == legacy_shape()


def legacy_shape() -> tuple[int, ...]:
    """The shape of a legacy key (``jax.random.PRNGKey``) under JAX's default PRNG implementation."""
    return _legacy_shape(default_prng_impl())


@functools.cache
def _legacy_shape(impl: str) -> tuple[int, ...]:
    # Abstract: neither makes a key nor starts JAX's backend.
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape)


def to_key(owner: str, seed_or_key: Any, impl: Any = None) -> Any:
    """Turn a seed (int or None) or a key into a key, naming ``owner`` in errors.

    A seed makes a legacy key, or with ``impl`` (a ``jax.random.key_impl``) a typed one.
    """
    if seed_or_key is None and impl is None:
        # A legacy key built on the host, so that creating a RandomState (and
        # importing statemap.random) does not start JAX's backend.
        words = np.zeros(legacy_shape(), dtype=np.uint32)
        words[-1] = secrets.randbits(31)
        return words
    if seed_or_key is None:
        seed_or_key = secrets.randbits(31)
    if isinstance(seed_or_key, (int, np.integer)) and not isinstance(seed_or_key, bool):
        return jax.random.key(seed_or_key, impl=impl) if impl is not None else jax.random.PRNGKey(seed_or_key)
    if is_key(seed_or_key):
        return jnp.asarray(seed_or_key)
    raise TypeError(
        f"statemap.{owner}: `seed_or_key` must be an int seed, None, a typed key "
        f"(`jax.random.key(0)`) or a legacy uint32{list(legacy_shape())} key (`jax.random.PRNGKey(0)`), "
        f"got {_kind(seed_or_key)}: {seed_or_key!r}."
    )


def _kind(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return type(value).__name__ if shape is None else f"{type(value).__name__} of shape {tuple(shape)}"


def _shape(owner: str, shape: Shape | None) -> tuple[int, ...]:
    if shape is None:
        return ()
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        return (int(shape),)
    if isinstance(shape, Sequence) and all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        return tuple(int(d) for d in shape)
    raise TypeError(
        f"statemap.RandomState.{owner}: `shape` must be an int or a tuple of "
        f"non-negative ints, got {shape!r}."
    )


class RandomState(State):
    """A state holding a JAX PRNG key, advanced every time a key is drawn.

    Inside ``statemap.vmap``/``statemap.pmap`` each lane sees its own key, and
    the state advances exactly once per call.

    Args:
      seed_or_key: an int seed, a typed key (``jax.random.key``), a legacy
        key (``jax.random.PRNGKey``: ``uint32[2]`` under the default threefry
        implementation), or None for a fresh seed from the operating system.
      tag: optional tag for filters.
      name: optional name for messages and paths.

    Raises:
      TypeError: if ``seed_or_key`` is none of the above.

    Example:
      >>> import statemap
      >>> rng = statemap.RandomState(0)
      >>> x = rng.normal((3,))
      >>> y = statemap.RandomState(0).normal((3,))
      >>> bool((x == y).all())
      True
    """

    __slots__ = ()

    def __init__(self, seed_or_key: Any = None, *, tag: str | None = None, name: str | None = None):
        super().__init__(to_key("RandomState", seed_or_key), tag=tag, name=name)

    def seed(self, seed_or_key: Any = None) -> None:
        """Reset the key from an int seed or a key; a seed keeps the key's kind.

        Example:
          >>> import statemap
          >>> rng = statemap.RandomState(1)
          >>> a = rng.uniform()
          >>> rng.seed(1)
          >>> bool(rng.uniform() == a)
          True
        """
        typed = jax.dtypes.issubdtype(self.value.dtype, jax.dtypes.prng_key)
        self.value = to_key("RandomState.seed", seed_or_key, jax.random.key_impl(self.value) if typed else None)

    def next_key(self) -> jax.Array:
        """Return a fresh key and advance the state.

        Example:
          >>> import statemap
          >>> rng = statemap.RandomState(0)
          >>> bool((rng.next_key() != rng.next_key()).any())
          True
        """
        advanced, key = jax.random.split(self.value)
        self.value = advanced
        return key

    def split_key(self, n: int) -> jax.Array:
        """Return ``n`` fresh keys (stacked) and advance the state once.

        Raises:
          ValueError: if ``n`` is not a positive int.

        Example:
          >>> import statemap
          >>> statemap.RandomState(0).split_key(4).shape
          (4, 2)
        """
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"statemap.RandomState.split_key: `n` must be a positive int, got {n!r}.")
        keys = jax.random.split(self.value, int(n) + 1)
        self.value = keys[0]
        return keys[1:]

    def normal(self, shape: Shape | None = (), dtype: Any = float) -> jax.Array:
        """Standard normal draws of ``shape``, as ``jax.random.normal``.

        Example:
          >>> import statemap
          >>> statemap.RandomState(0).normal((2, 3)).shape
          (2, 3)
        """
        shape = _shape("normal", shape)
        return jax.random.normal(self.next_key(), shape, dtype)

    def uniform(
        self, shape: Shape | None = (), dtype: Any = float, minval: Any = 0.0, maxval: Any = 1.0
    ) -> jax.Array:
        """Uniform draws in ``[minval, maxval)``, as ``jax.random.uniform``.

        Example:
          >>> import statemap
          >>> x = statemap.RandomState(0).uniform((100,), minval=2.0, maxval=3.0)
          >>> bool(((x >= 2.0) & (x < 3.0)).all())
          True
        """
        shape = _shape("uniform", shape)
        return jax.random.uniform(self.next_key(), shape, dtype, minval, maxval)

    def randint(self, shape: Shape | None, minval: Any, maxval: Any, dtype: Any = int) -> jax.Array:
        """Integers in ``[minval, maxval)``, as ``jax.random.randint``.

        Example:
          >>> import statemap
          >>> x = statemap.RandomState(0).randint((5,), 0, 3)
          >>> bool(((x >= 0) & (x < 3)).all())
          True
        """
        shape = _shape("randint", shape)
        return jax.random.randint(self.next_key(), shape, minval, maxval, dtype)

    def bernoulli(self, shape: Shape | None = (), p: Any = 0.5) -> jax.Array:
        """Booleans that are True with probability ``p``, as ``jax.random.bernoulli``.

        Example:
          >>> import statemap
          >>> statemap.RandomState(0).bernoulli((4,), p=1.0)
          Array([ True,  True,  True,  True], dtype=bool)
        """
        shape = _shape("bernoulli", shape)
        return jax.random.bernoulli(self.next_key(), p, shape)
