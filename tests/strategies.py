"""Small stateful programs as data, for the differential property tests.

A :class:`Program` describes a mapped call: the axis size, the arguments
(lane shapes and ``in_axes``), the states (kind, lane shape, split axis, how
``state_in_axes``/``state_out_axes`` select them), the write policy, and the
lane function as a list of operations. Being plain data, hypothesis can shrink
it, and the same description is interpreted twice:

* :func:`make_mapping` builds the mapping under test (``statemap.vmap``,
  ``pmap``, ``shard_map``, or ``LaxMapMapping`` for ``statemap.map``) over
  a lane function closed over real ``State`` objects;
* :func:`oracle` threads the same values explicitly through ``jax.vmap`` /
  ``jax.pmap`` (state values in, new state values out) and decides by itself,
  from the program's structure (:func:`analyse`), which values are batched and
  so how every written state must leave the call, or that the call is refused.
  For vmap, JAX confirms the oracle's batched-ness claims: the oracle maps
  not-batched values with ``out_axes=None`` (JAX rejects a batched one), and a
  predicted refusal is checked with ``jax.vmap(..., out_axes=None)``.

The mapping under test is a parameter of :func:`programs`, which draws only
what it can express (``statemap.map``: no collectives, no ``axis_size``,
arguments and outputs on axis 0, and a ``batch_size``).

Lane operations (acc is a float32 scalar register, cnt an int32 counter that
only a ``scan`` advances, so it is never batched):

======================  ====================================================
``Read(src)``           acc += mean(sin(src))
``Write(t, how, term)`` t = cos(t)/2 + term (``update``) or term (``replace``);
                        term: acc, cnt/4, 0.75, or mean(sin(src))/2
``Psum()``              acc = sin(psum(acc, axis_name))
``Scan(length, src)``   ``lax.scan``: cnt += 1; acc = acc/2 + sin(cnt) (+ a read of src)
``Jit(ops)``            acc = jax.jit(reads and psums)(acc), states read inside the jit
``Draw(r, dist, shp)``  acc += mean(r.<dist>(shp))
``Reseed(r, seed)``     r.seed(seed)
``Create(shape, term)`` a new State(full(shape, term)) made inside the lane
``Out(src, axis)``      an output, sin(src) + acc, on ``out_axes`` entry axis
======================  ====================================================
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

import statemap
from statemap import filters

F32 = jnp.float32

# ---------------------------------------------------------------------------
# The description.


@dataclass(frozen=True)
class Arg:
    """A positional array argument (or a keyword one, mapped on axis 0)."""

    shape: tuple[int, ...]  # what one lane sees
    axis: int | None  # its in_axes entry, relative to the full rank
    keyword: bool = False


@dataclass(frozen=True)
class StateDef:
    """One state the program closes over (or, for 'argstate', receives as an argument).

    kind: 'split' (selected by ``state_in_axes`` on ``axis``), 'broadcast'
    (unselected, or selected with ``None`` when ``select`` is not 'none'),
    'random' (``mode``: 'lane' per-lane key, 'split' a stack of keys split on
    ``axis``, 'broadcast' selected with None), 'argstate' (a State passed as a
    positional argument; ``axis`` is its ``in_axes`` entry).
    """

    kind: str
    shape: tuple[int, ...] = ()
    axis: int | None = None
    select: str = "none"  # filter form in state_in_axes
    out: tuple = ()  # state_out_axes: () unselected, (None,) declared, (k,) stacked on k
    out_select: str = "instance"
    cls: str = "State"
    mode: str = "lane"
    typed: bool = False
    seed: int = 0
    shape2: tuple[int, ...] | None = None  # a pytree value {'a': shape, 'b': shape2}

    @property
    def shapes(self) -> Any:
        """The lane shape of every leaf (a dict for a pytree value)."""
        return self.shape if self.shape2 is None else {"a": self.shape, "b": self.shape2}

    @property
    def min_rank(self) -> int:
        return min(len(self.shape), len(self.shape2 if self.shape2 is not None else self.shape))


@dataclass(frozen=True)
class Read:
    src: tuple[str, int]  # ('arg', i) | ('state', j) | ('made', k)


@dataclass(frozen=True)
class Write:
    target: tuple[str, int]  # ('state', j) | ('made', k)
    how: str  # 'update' | 'replace'
    term: str  # 'acc' | 'cnt' | 'const'


@dataclass(frozen=True)
class Psum:
    pass


@dataclass(frozen=True)
class Scan:
    length: int
    src: tuple[str, int] | None


@dataclass(frozen=True)
class Jit:
    ops: tuple[Any, ...]  # Read and Psum only: writes inside a user jit leak tracers in JAX


@dataclass(frozen=True)
class Draw:
    rng: int
    dist: str  # 'normal' | 'uniform' | 'bernoulli' | 'randint'
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Reseed:
    rng: int
    seed: int


@dataclass(frozen=True)
class Create:
    shape: tuple[int, ...]
    term: str


@dataclass(frozen=True)
class Out:
    src: Any  # 'acc' | 'cnt' | ('arg', i) | ('state', j) | ('made', k) | ('key', j): a RandomState's key
    axis: int | None


@dataclass(frozen=True)
class Program:
    n: int
    args: tuple[Arg, ...]
    states: tuple[StateDef, ...]
    ops: tuple[Any, ...]
    policy: str = "raise"
    axis_name: str | None = None
    axis_size: bool = False  # pass axis_size=n
    in_axes_int: bool = False  # write in_axes as one int when all entries agree
    out_axes_int: bool = False
    in_order: tuple[int, ...] = ()  # permutation of the state_in_axes groups
    bare_in: bool = False  # state_in_axes given as a bare filter (only group is axis 0)
    bare_out: bool = False
    shadow_in: bool = False  # a trailing state_in_axes entry that must lose (first match wins)
    shadow_out: bool = False
    calls: int = 1
    mutate: str = "no"  # between calls the host changes the states' 'values' (or the broadcast ones' 'shapes')
    explain: bool = False
    data_seed: int = 0
    pack: bool = False  # positional array args go in one dict argument (in_axes a pytree prefix)
    batch_size: int | None = None  # statemap.map only: lanes per chunk

    @property
    def positional(self) -> list[Any]:
        """Positional entries: array args (Arg, or ('pack', indices)), then ('state', j) arg-states."""
        plain = [i for i, a in enumerate(self.args) if not a.keyword]
        out: list[Any] = [("pack", tuple(plain))] if self.pack and plain else [self.args[i] for i in plain]
        out += [("state", j) for j, s in enumerate(self.states) if s.kind == "argstate"]
        return out

    @property
    def keywords(self) -> list[tuple[int, Arg]]:
        return [(i, a) for i, a in enumerate(self.args) if a.keyword]


# ---------------------------------------------------------------------------
# Shapes and axes.


def norm(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    assert -ndim <= axis < ndim, (axis, ndim)
    return axis % ndim


def tree_axes(axis: int | None, value: Any, extra: int = 0) -> Any:
    """``axis`` normalised for every leaf of ``value`` (rank + ``extra``); None stays None."""
    if axis is None:
        return None
    return jax.tree.map(lambda x: norm(axis, np.ndim(x) + extra), value)


def full_shape(lane_shape: tuple[int, ...], axis: int | None, n: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(lane_shape)
    a = norm(axis, len(lane_shape) + 1)
    return (*lane_shape[:a], n, *lane_shape[a:])


def key_lane_shape(typed: bool) -> tuple[int, ...]:
    return () if typed else (2,)


def new_key(seed: int, typed: bool) -> jax.Array:
    return jax.random.key(seed) if typed else jax.random.PRNGKey(seed)


def is_typed_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_host(x: Any) -> Any:
    """``x`` as an uncommitted host value (typed keys stay typed)."""
    if is_typed_key(x):
        return jax.random.wrap_key_data(np.asarray(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return np.asarray(x)


def key_bits(x: Any) -> np.ndarray:
    return np.asarray(jax.random.key_data(x) if is_typed_key(x) else x)


# ---------------------------------------------------------------------------
# Static analysis: what the program touches, writes, and which values are batched.


@dataclass
class Analysis:
    touched: set[int]
    written: set[int]  # states written (RandomState draws/reseeds included)
    state_batched: dict[int, bool]  # at the end of the lane
    outs: list[bool]
    made: list[bool]
    out_srcs: list[Any]


def initial_batched(prog: Program) -> dict[int, bool]:
    b = {}
    for j, s in enumerate(prog.states):
        if s.kind == "split":
            b[j] = True
        elif s.kind == "broadcast":
            b[j] = False
        elif s.kind == "argstate":
            b[j] = s.axis is not None
        else:
            b[j] = s.mode in ("lane", "split")
    return b


def analyse(
    prog: Program,
    initial: dict[int, bool] | None = None,
    args_b: list[bool] | None = None,
    psum_clears: bool = True,
) -> Analysis:
    """Batched-ness by construction: a value is batched iff it depends on a mapped input.

    By default along the program's own axis. For an enclosing map, pass which
    states (``initial``) and args (``args_b``) vary along it, and
    ``psum_clears=False``: a ``psum`` over the inner axis keeps outer variation.
    """
    if args_b is None:
        args_b = [a.keyword or a.axis is not None for a in prog.args]
    sb = initial_batched(prog) if initial is None else dict(initial)
    made_b: list[bool] = []
    touched: set[int] = set()
    written: set[int] = set()
    outs: list[bool] = []
    out_srcs: list[Any] = []
    reg = {"acc": False, "cnt": False}

    def src_b(src: Any) -> bool:
        if src in ("acc", "cnt"):
            return reg[src]
        if src == "const":
            return False
        kind, i = src
        if kind == "arg":
            return args_b[i]
        if kind == "state":
            touched.add(i)
            return sb[i]
        return made_b[i]

    def run(ops: Sequence[Any]) -> None:
        for op in ops:
            if isinstance(op, Read):
                reg["acc"] = reg["acc"] or src_b(op.src)
            elif isinstance(op, Write):
                old = src_b(op.target)
                new = src_b(op.term) or (op.how == "update" and old)
                kind, i = op.target
                if kind == "state":
                    sb[i] = new
                    written.add(i)
                else:
                    made_b[i] = new
            elif isinstance(op, Psum):
                reg["acc"] = reg["acc"] and not psum_clears
            elif isinstance(op, Scan):
                if op.src is not None:
                    reg["acc"] = reg["acc"] or src_b(op.src)
            elif isinstance(op, Jit):
                run(op.ops)
            elif isinstance(op, Draw):
                touched.add(op.rng)
                written.add(op.rng)
                reg["acc"] = reg["acc"] or sb[op.rng]
            elif isinstance(op, Reseed):
                touched.add(op.rng)
                written.add(op.rng)
                sb[op.rng] = False
            elif isinstance(op, Create):
                made_b.append(src_b(op.term))
            elif isinstance(op, Out):
                if op.src in ("acc", "cnt"):
                    b = src_b(op.src)
                elif op.src[0] == "key":
                    b = src_b(("state", op.src[1]))
                else:
                    b = src_b(op.src) or reg["acc"]
                outs.append(b)
                out_srcs.append(op.src)

    run(prog.ops)
    return Analysis(touched, written, dict(sb), outs, made_b, out_srcs)


def entry_axis(s: StateDef) -> int | None:
    """The axis a state is split on when it enters (None: not split)."""
    if s.kind in ("split", "argstate"):
        return s.axis
    if s.kind == "random" and s.mode == "split":
        return s.axis
    return None


def is_lane_key(s: StateDef) -> bool:
    return s.kind == "random" and s.mode == "lane"


def needs_axis_size(prog: Program) -> bool:
    """Whether nothing mapped gives the axis size (so ``axis_size=n`` must be passed)."""
    if any(a.keyword or a.axis is not None for a in prog.args):
        return False
    touched = analyse(prog).touched
    return not any(entry_axis(prog.states[j]) is not None for j in touched)


# ---------------------------------------------------------------------------
# Interpreting the lane operations (shared by statemap and the oracle).


class Env:
    """How the lane reaches its values: real States (statemap) or explicit values (oracle)."""

    made: list[Any]

    def read(self, src: tuple[str, int]) -> Any: ...

    def write(self, target: tuple[str, int], value: Any) -> None: ...

    def draw(self, j: int, dist: str, shape: tuple[int, ...]) -> Any: ...

    def reseed(self, j: int, seed: int) -> None: ...

    def create(self, k: int, value: Any) -> None: ...


def _stat(x: Any) -> Any:
    leaves = jax.tree.leaves(x)
    return sum(jnp.mean(jnp.sin(jnp.asarray(leaf, F32))) for leaf in leaves) / len(leaves)


def interpret(prog: Program, env: Env) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    regs = {"acc": jnp.zeros((), F32), "cnt": jnp.zeros((), jnp.int32)}
    outs: list[Any] = []

    def term(name: Any) -> Any:
        if name == "acc":
            return regs["acc"]
        if name == "cnt":
            return regs["cnt"].astype(F32) * 0.25
        if name == "const":
            return jnp.asarray(0.75, F32)
        return 0.5 * _stat(env.read(name))

    def value_of(src: Any) -> Any:
        return regs[src] if src in ("acc", "cnt") else env.read(src)

    def apply(op: Any) -> None:
        if isinstance(op, Read):
            regs["acc"] = regs["acc"] + 0.5 * _stat(env.read(op.src))
        elif isinstance(op, Write):
            old = env.read(op.target)
            t = term(op.term)
            if op.how == "update":
                new = jax.tree.map(lambda o: (jnp.cos(o) * 0.5 + t).astype(F32), old)
            else:
                new = jax.tree.map(lambda o: jnp.broadcast_to(t, jnp.shape(o)).astype(F32), old)
            env.write(op.target, new)
        elif isinstance(op, Psum):
            regs["acc"] = jnp.sin(jax.lax.psum(regs["acc"], prog.axis_name))
        elif isinstance(op, Scan):

            def body(carry: Any, _: Any) -> Any:
                c, a = carry
                c = c + 1
                a = a * 0.5 + jnp.sin(c.astype(F32))
                if op.src is not None:
                    a = a + 0.25 * _stat(env.read(op.src))
                return (c, a), None

            (regs["cnt"], regs["acc"]), _ = jax.lax.scan(body, (regs["cnt"], regs["acc"]), None, length=op.length)
        elif isinstance(op, Jit):

            def inner(a: Any) -> Any:
                for sub in op.ops:
                    if isinstance(sub, Read):
                        a = a + 0.5 * _stat(env.read(sub.src))
                    else:
                        a = jnp.sin(jax.lax.psum(a, prog.axis_name))
                return a

            regs["acc"] = jax.jit(inner)(regs["acc"])
        elif isinstance(op, Draw):
            x = env.draw(op.rng, op.dist, op.shape)
            regs["acc"] = regs["acc"] + jnp.mean(jnp.asarray(x, F32))
        elif isinstance(op, Reseed):
            env.reseed(op.rng, op.seed)
        elif isinstance(op, Create):
            env.create(len(env.made), jnp.full(op.shape, term(op.term), F32))
        elif isinstance(op, Out):
            if op.src in ("acc", "cnt"):
                outs.append(jnp.asarray(value_of(op.src)))
            elif op.src[0] == "key":
                outs.append(env.read(("state", op.src[1])))
            else:
                acc = regs["acc"]
                outs.append(jax.tree.map(lambda x: jnp.sin(jnp.asarray(x, F32)) + acc, value_of(op.src)))
        else:  # pragma: no cover
            raise TypeError(op)

    for op in prog.ops:
        apply(op)
    return tuple(outs), tuple(env.made)


class StatemapEnv(Env):
    """Closed-over States (arg-states: the objects the function received)."""

    def __init__(self, states: list[statemap.State], args: list[Any]):
        self.states = states
        self.args = args
        self.made: list[statemap.State] = []

    def read(self, src: tuple[str, int]) -> Any:
        kind, i = src
        if kind == "arg":
            return self.args[i]
        if kind == "state":
            return self.states[i].value
        return self.made[i].value

    def write(self, target: tuple[str, int], value: Any) -> None:
        kind, i = target
        (self.states[i] if kind == "state" else self.made[i]).value = value

    def draw(self, j: int, dist: str, shape: tuple[int, ...]) -> Any:
        rng = self.states[j]
        if dist == "normal":
            return rng.normal(shape)
        if dist == "uniform":
            return rng.uniform(shape)
        if dist == "bernoulli":
            return rng.bernoulli(shape, p=0.5)
        return rng.randint(shape, 0, 5)

    def reseed(self, j: int, seed: int) -> None:
        self.states[j].seed(seed)

    def create(self, k: int, value: Any) -> None:
        self.made.append(statemap.State(value, name=f"m{k}"))


class OracleEnv(Env):
    """Explicit values: what a hand-written pure-JAX lane function threads through."""

    def __init__(self, args: list[Any], values: dict[int, Any]):
        self.args = args
        self.values = dict(values)
        self.written: dict[int, None] = {}
        self.made: list[Any] = []

    def read(self, src: tuple[str, int]) -> Any:
        kind, i = src
        if kind == "arg":
            return self.args[i]
        if kind == "state":
            return self.values[i]
        return self.made[i]

    def write(self, target: tuple[str, int], value: Any) -> None:
        kind, i = target
        if kind == "state":
            self.values[i] = value
            self.written[i] = None
        else:
            self.made[i] = value

    def draw(self, j: int, dist: str, shape: tuple[int, ...]) -> Any:
        advanced, key = jax.random.split(self.values[j])  # RandomState.next_key
        self.values[j] = advanced
        self.written[j] = None
        if dist == "normal":
            return jax.random.normal(key, shape, float)
        if dist == "uniform":
            return jax.random.uniform(key, shape, float, 0.0, 1.0)
        if dist == "bernoulli":
            return jax.random.bernoulli(key, 0.5, shape)
        return jax.random.randint(key, shape, 0, 5, int)

    def reseed(self, j: int, seed: int) -> None:
        self.values[j] = new_key(seed, is_typed_key(self.values[j]))
        self.written[j] = None

    def create(self, k: int, value: Any) -> None:
        self.made.append(value)


# ---------------------------------------------------------------------------
# Concrete inputs.


def arg_values(prog: Program, call: int) -> list[np.ndarray]:
    """Full (mapped) values of every Arg for one call; new data each call."""
    out = []
    for i, a in enumerate(prog.args):
        rng = np.random.default_rng((prog.data_seed, call, i))
        out.append(rng.standard_normal(full_shape(a.shape, 0 if a.keyword else a.axis, prog.n)).astype(np.float32))
    return out


def initial_values(prog: Program) -> dict[int, Any]:
    values: dict[int, Any] = {}
    for j, s in enumerate(prog.states):
        if s.kind == "random":
            key = new_key(s.seed, s.typed)
            if s.mode == "split":
                stack = jax.random.split(key, prog.n)
                key = jnp.moveaxis(stack, 0, norm(s.axis, stack.ndim))
            values[j] = key
        else:
            rng = np.random.default_rng((prog.data_seed, 1000 + j))
            axis = s.axis if s.kind in ("split", "argstate") else None

            def leaf(shape: tuple[int, ...], rng: Any = rng, axis: int | None = axis) -> Any:
                return jnp.asarray(rng.standard_normal(full_shape(shape, axis, prog.n)).astype(np.float32))

            values[j] = jax.tree.map(leaf, s.shapes, is_leaf=lambda x: isinstance(x, tuple))
    return values


def mutated(prog: Program, values: dict[int, Any]) -> dict[int, Any]:
    """What the host writes into the states between calls: new values, and for
    ``mutate='shapes'`` a new leading axis on every broadcast state (a new plan)."""
    out = dict(values)
    for j, s in enumerate(prog.states):
        if s.kind == "random":
            continue
        # In NumPy: eager JAX would compile each operation for each new shape.
        new = jax.tree.map(lambda x: np.asarray(x) * np.float32(-0.5) + np.float32(0.25), values[j])
        if prog.mutate == "shapes" and entry_axis(s) is None:
            new = jax.tree.map(lambda x, y: np.stack([np.asarray(x), y]), values[j], new)
        out[j] = jax.tree.map(jnp.asarray, new)
    return out


# ---------------------------------------------------------------------------
# The statemap side.

STATE_CLASSES = {
    "State": statemap.State,
    "ParamState": statemap.ParamState,
    "HiddenState": statemap.HiddenState,
    "ShortTermState": statemap.ShortTermState,
    "LongTermState": statemap.LongTermState,
}


def make_states(prog: Program, values: dict[int, Any]) -> list[statemap.State]:
    states: list[statemap.State] = []
    for j, s in enumerate(prog.states):
        if s.kind == "random":
            state: statemap.State = statemap.RandomState(s.seed, name=f"s{j}", tag=f"t{j}")
        else:
            state = STATE_CLASSES[s.cls](jnp.zeros(()), name=f"s{j}", tag=f"t{j}")
        state.value = values[j]
        states.append(state)
    return states


def filter_for(form: str, j: int, state: statemap.State) -> Any:
    if form == "tag":
        return f"t{j}"
    if form == "instance":
        return state
    if form == "list":
        return [state]
    if form == "withtag":
        return filters.WithTag(f"t{j}")
    if form == "path":
        return filters.PathContains(f"s{j}")
    if form == "predicate":
        return lambda path, s, name=f"s{j}": path == (name,)
    raise ValueError(form)


def _axes_spec(groups: dict[Any, list[Any]], order: Sequence[int], bare: bool, shadow: bool, selected: list[Any]) -> Any:
    """``{axis: filter}`` with the groups in ``order``, maybe a losing shadow entry, maybe bare."""
    if not groups:
        return None
    position = {group: pos for pos, group in enumerate(order)}
    keys = [k for i, k in sorted(enumerate(groups), key=lambda ik: position.get(ik[0], len(groups) + ik[0]))]
    spec = {k: (groups[k][0] if len(groups[k]) == 1 else list(groups[k])) for k in keys}
    if shadow:
        spare = next(k for k in (1, 0, -1, None, 2, -2, 3) if k not in spec)
        spec[spare] = list(selected)  # first match wins: never used
    if bare and list(spec) == [0]:
        return spec[0]
    return spec


def state_in_axes(prog: Program, states: list[statemap.State]) -> Any:
    groups: dict[Any, list[Any]] = {}
    selected = []
    for j, (s, state) in enumerate(zip(prog.states, states)):
        if s.select == "none":
            continue
        key = entry_axis(s) if s.kind != "argstate" else s.axis
        groups.setdefault(key, []).append(filter_for(s.select, j, state))
        selected.append(state)
    return _axes_spec(groups, prog.in_order, prog.bare_in, prog.shadow_in, selected)


def state_out_axes(prog: Program, states: list[statemap.State]) -> Any:
    groups: dict[Any, list[Any]] = {}
    selected = []
    for j, (s, state) in enumerate(zip(prog.states, states)):
        if not s.out:
            continue
        groups.setdefault(s.out[0], []).append(filter_for(s.out_select, j, state))
        selected.append(state)
    return _axes_spec(groups, (), prog.bare_out, prog.shadow_out, selected)


def in_axes(prog: Program) -> Any:
    """``in_axes`` for the positional arguments: one int, or a tuple (a dict for a pack)."""
    entries: list[Any] = []
    flat: list[Any] = []
    for e in prog.positional:
        if isinstance(e, Arg):
            entries.append(e.axis)
            flat.append(e.axis)
        elif e[0] == "pack":
            axes = {f"a{i}": prog.args[i].axis for i in e[1]}
            same = len(set(axes.values())) == 1
            entries.append(next(iter(axes.values())) if same and prog.in_axes_int else axes)
            flat += axes.values()
        else:
            entries.append(prog.states[e[1]].axis)
            flat.append(prog.states[e[1]].axis)
    if prog.in_axes_int and flat and all(a == flat[0] for a in flat):
        return flat[0]
    if not entries:
        return 0
    return tuple(entries)


def out_axes(prog: Program) -> Any:
    axes = [op.axis for op in iter_ops(prog.ops) if isinstance(op, Out)]
    if prog.out_axes_int and axes and all(a == axes[0] for a in axes):
        return axes[0]
    return (tuple(axes), 0)


def iter_ops(ops: Sequence[Any]) -> Any:
    for op in ops:
        yield op
        if isinstance(op, Jit):
            yield from iter_ops(op.ops)


def make_mapping(prog: Program, states: list[statemap.State], which: str) -> statemap.StatefulMapping:
    def fn(*pos: Any, **kw: Any) -> Any:
        args: list[Any] = [None] * len(prog.args)
        lane_states = list(states)
        positional_args = iter(i for i, a in enumerate(prog.args) if not a.keyword)
        for entry, value in zip(prog.positional, pos):
            if isinstance(entry, Arg):
                args[next(positional_args)] = value
            elif entry[0] == "pack":
                for i in entry[1]:
                    args[i] = value[f"a{i}"]
            else:
                lane_states[entry[1]] = value  # the State the function received
        for i, _ in prog.keywords:
            args[i] = kw[f"k{i}"]
        return interpret(prog, StatemapEnv(lane_states, args))

    keywords: dict[str, Any] = {
        "state_in_axes": state_in_axes(prog, states),
        "state_out_axes": state_out_axes(prog, states),
        "unexpected_out_state_mapping": prog.policy,
    }
    if which == "map":  # a program built for it: every argument and output on axis 0
        return statemap.LaxMapMapping(fn, batch_size=prog.batch_size, **keywords)
    keywords.update(in_axes=in_axes(prog), out_axes=out_axes(prog), axis_size=prog.n if prog.axis_size else None)
    if which == "vmap":
        return statemap.vmap(fn, axis_name=prog.axis_name, **keywords)
    if which == "shard_map":  # one lane per device, checked against the pmap oracle
        return statemap.shard_map(fn, prog.axis_name, devices=jax.devices()[: prog.n], **keywords)
    return statemap.pmap(fn, prog.axis_name, **keywords)


def call_arguments(prog: Program, states: list[statemap.State], args: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    positional_args = iter(i for i, a in enumerate(prog.args) if not a.keyword)
    pos: list[Any] = []
    for e in prog.positional:
        if isinstance(e, Arg):
            pos.append(args[next(positional_args)])
        elif e[0] == "pack":
            pos.append({f"a{i}": args[i] for i in e[1]})
        else:
            pos.append(states[e[1]])
    kw = {f"k{i}": args[i] for i, _ in prog.keywords}
    return pos, kw


# ---------------------------------------------------------------------------
# The oracle.


@dataclass
class Expected:
    """What one call must do: refuse (``rejection``), or give these results."""

    rejection: str | None = None  # 'output' (ValueError) or 'state' (BatchAxisError)
    refused: list[int] = field(default_factory=list)  # states the policy refuses
    warned: list[int] = field(default_factory=list)  # states the 'warn' policy stacks
    outs: tuple[Any, ...] = ()
    made: tuple[Any, ...] = ()
    values: dict[int, Any] = field(default_factory=dict)  # every state's value after the call
    written: set[int] = field(default_factory=set)
    advanced: set[int] = field(default_factory=set)  # per-lane-key states touched: advanced once
    outer_warned: list[int] = field(default_factory=list)  # nested: states the outer 'warn' policy stacks


class OracleError(AssertionError):
    """The oracle's own bookkeeping disagrees with JAX: a bug in the test, not in statemap."""


def _exit(prog: Program, j: int, batched: bool) -> tuple[str, int | None]:
    """How written state j leaves: ('stacked', axis) | ('as_is', None) | ('refused', None) | ('warned', 0)."""
    s = prog.states[j]
    if s.out and s.out[0] is not None:
        return "stacked", s.out[0]
    if s.out:  # declared None
        return ("refused", None) if batched else ("as_is", None)
    if entry_axis(s) is not None:
        return "stacked", entry_axis(s)
    if not batched:
        return "as_is", None
    if prog.policy == "raise":
        return "refused", None
    return ("warned" if prog.policy == "warn" else "stacked"), 0


def on_devices(which: str) -> bool:
    """Whether statemap's ``which`` runs one lane per device (its oracle is ``jax.pmap``)."""
    return which in ("pmap", "shard_map")


def oracle_lane(prog: Program) -> tuple[Callable[..., Any], list[set[int]]]:
    """The pure lane function: (arg values, state values) -> (outputs, written values, created
    values); and the list where each trace of it records which states it wrote."""
    num_args = len(prog.args)
    lane_written: list[set[int]] = []

    def lane(*xs: Any) -> Any:
        env = OracleEnv(list(xs[:num_args]), dict(enumerate(xs[num_args:])))
        outs, made = interpret(prog, env)
        written = {j: env.values[j] for j in env.written if not is_lane_key(prog.states[j])}
        lane_written.append(set(env.written))
        return outs, written, made

    return lane, lane_written


def oracle(prog: Program, values: dict[int, Any], args: list[Any], which: str, compiled: dict[Any, Any] | None = None) -> Expected:
    """Run the program by hand through ``jax.vmap`` (``jax.pmap`` for a mapping on devices):
    values in, values out. ``statemap.map`` promises vmap's numbers: its oracle is ``jax.vmap``.

    ``compiled``: a dict the caller keeps between calls of one program, where
    the oracle keeps its lane function and compiled programs, so a call with
    the same shapes as an earlier one compiles nothing.
    """
    compiled = {} if compiled is None else compiled
    n, info = prog.n, analyse(prog)
    inputs: list[Any] = []
    axes: list[Any] = []
    for a, x in zip(prog.args, args):
        inputs.append(x)
        axes.append(norm(0 if a.keyword else a.axis, x.ndim))
    new_parents: dict[int, Any] = {}
    for j, s in enumerate(prog.states):
        v = values[j]
        if is_lane_key(s):
            new_parents[j], base = jax.random.split(v)
            inputs.append(jax.random.split(base, n))  # == fold_in(base, i) for lane i (JAX-NOTES fact 3)
            axes.append(0)
        else:
            inputs.append(v)
            axes.append(tree_axes(entry_axis(s), v))
    if "lane" not in compiled:
        compiled["lane"] = oracle_lane(prog)
    lane, lane_written = compiled["lane"]
    name = prog.axis_name or "oracle"
    shapes = jax.eval_shape(
        jax.vmap(lane, in_axes=tuple(axes), out_axes=0, axis_name=name, axis_size=n), *inputs
    )
    if lane_written[-1] != info.written:
        raise OracleError(f"analysis says written {info.written}, the lane wrote {lane_written[-1]}")
    out_shapes, written_shapes, _ = shapes

    # Decide every output's axis from the analysis (not from statemap, not from JAX).
    out_ops = [op for op in iter_ops(prog.ops) if isinstance(op, Out)]
    def placed(axis: int | None, stacked: Any) -> Any:  # stacked: shapes with the lane axis first
        return None if axis is None else jax.tree.map(lambda sh: norm(axis, len(sh.shape)), stacked)

    user_axes = [placed(op.axis, sh) for op, sh in zip(out_ops, out_shapes)]
    bad_outputs = [i for i, (op, b) in enumerate(zip(out_ops, info.outs)) if op.axis is None and b]
    exits = {j: _exit(prog, j, info.state_batched[j]) for j in written_shapes}
    state_axes = {j: None if how in ("as_is", "refused") else placed(ax, written_shapes[j]) for j, (how, ax) in exits.items()}
    made_axes = tuple(0 for _ in shapes[2])
    tree = (tuple(user_axes), state_axes, made_axes)

    expected = Expected(written=set(info.written), advanced={j for j in new_parents if j in info.touched})
    if bad_outputs or any(how == "refused" for how, _ in exits.values()):
        expected.rejection = "output" if bad_outputs else "state"
        expected.refused = sorted(j for j, (how, _) in exits.items() if how == "refused")
        if not on_devices(which):
            # JAX must agree that these values vary across lanes.
            try:
                jax.eval_shape(jax.vmap(lane, in_axes=tuple(axes), out_axes=tree, axis_name=name, axis_size=n), *inputs)
            except ValueError as err:
                if "out_axes is None" not in str(err):
                    raise
            else:
                raise OracleError("the oracle predicts a refusal, but JAX finds every None output unbatched")
        return expected
    expected.warned = sorted(j for j, (how, _) in exits.items() if how == "warned")

    key = (which, repr(axes), repr(tree))  # the same axes for the same shapes: a compiled program
    if not on_devices(which):
        if key not in compiled:
            # Under jax.jit: one compilation, not one per primitive and shape.
            compiled[key] = jax.jit(jax.vmap(lane, in_axes=tuple(axes), out_axes=tree, axis_name=name, axis_size=n))
        try:
            result = compiled[key](*inputs)
        except ValueError as err:
            if "out_axes is None" in str(err):
                raise OracleError(f"the oracle thought a value unbatched, JAX disagrees: {err}") from err
            raise
    else:
        # jax.pmap: non-negative axes only, and a mapped input even when nothing else is.
        # Inputs go through the host first: jax.pmap 0.10.2 rejects an array sharded
        # by an earlier pmap on a broadcast input, and a committed one on a mapped one.
        inputs = [jax.tree.map(to_host, x) for x in inputs]
        if key not in compiled:
            compiled[key] = jax.pmap(lambda _, *xs: lane(*xs), axis_name=name, in_axes=(0, *axes), out_axes=tree)
        result = jax.block_until_ready(compiled[key](np.arange(n), *inputs))
    outs, written, made = result
    expected.outs, expected.made = tuple(outs), tuple(made)
    expected.values = dict(values)
    for j, v in written.items():
        expected.values[j] = v
    expected.values.update({j: new_parents[j] for j in expected.advanced})
    return expected


# ---------------------------------------------------------------------------
# Generating programs.

lane_shapes = st.lists(st.integers(1, 3), max_size=2).map(tuple)
FORMS = ["tag", "instance", "list", "withtag", "path", "predicate"]


def axis_in(rank: int) -> st.SearchStrategy[int]:
    """An axis (negative allowed) for an array of rank ``rank``."""
    return st.integers(-rank, rank - 1)


@st.composite
def arg_defs(draw: Any, leading: bool = False) -> Arg:
    """An argument; ``leading``: mapped on axis 0 (``statemap.map`` maps every argument so)."""
    shape = draw(lane_shapes)
    if leading or draw(st.booleans()):
        keyword = draw(st.integers(0, 4)) == 0
        return Arg(shape, 0, keyword=True) if keyword else Arg(shape, 0 if leading else draw(axis_in(len(shape) + 1)))
    return Arg(shape, None)


@st.composite
def state_defs(draw: Any, multi_call: bool, leading: bool = False) -> StateDef:
    """A state; ``leading``: a State argument is mapped on axis 0 (as ``statemap.map`` maps it)."""
    kind = draw(st.sampled_from(["split", "broadcast", "random", "argstate", "split", "broadcast"]))
    cls = draw(st.sampled_from(sorted(STATE_CLASSES)))
    out_select = draw(st.sampled_from(FORMS))
    if kind == "random":
        mode = draw(st.sampled_from(["lane", "lane", "split", "broadcast"]))
        typed = draw(st.booleans())
        seed = draw(st.integers(0, 2**16))
        if mode == "lane":
            # state_out_axes has no say over a per-lane key: it advances once whatever it says.
            out = draw(st.sampled_from([(), (), (0,), (None,)]))
            return StateDef("random", mode="lane", typed=typed, seed=seed, out=out, out_select=out_select)
        select = draw(st.sampled_from(FORMS))
        if mode == "split":
            rank = len(key_lane_shape(typed)) + 1
            return StateDef("random", axis=draw(axis_in(rank)), select=select, mode="split", typed=typed, seed=seed)
        return StateDef("random", select=select, mode="broadcast", typed=typed, seed=seed)
    shape = draw(lane_shapes)
    shape2 = draw(lane_shapes) if draw(st.integers(0, 3)) == 0 else None  # a pytree value
    rank = min(len(shape), len(shape2 if shape2 is not None else shape)) + 1
    if kind == "split":
        axis = draw(axis_in(rank))
        select = draw(st.sampled_from(FORMS))
    elif kind == "argstate":
        axis = 0 if leading else draw(st.one_of(st.none(), axis_in(rank)))
        select = "none"
    else:
        axis = None
        select = draw(st.sampled_from(["none", "none", *FORMS]))
    entry = axis if kind in ("split", "argstate") else None
    if multi_call and entry is not None:
        # Keep the state's shape across calls: stacked back where it came from.
        same = [(), (entry,)]
        if shape2 is None or len(shape2) == len(shape):
            same.append(((entry - rank) if entry >= 0 else (entry + rank),))
        out = draw(st.sampled_from(same))
    else:
        out = draw(st.one_of(st.just(()), st.just(()), st.just((None,)), axis_in(rank).map(lambda k: (k,))))
    return StateDef(kind, shape, axis, select, out, out_select, cls, shape2=shape2)


def _srcs(num_args: int, plain: list[int], made: int) -> list[tuple[str, int]]:
    return [("arg", i) for i in range(num_args)] + [("state", j) for j in plain] + [("made", k) for k in range(made)]


@st.composite
def op_defs(draw: Any, num_args: int, plain: list[int], randoms: list[int], made: int, named: bool, leading: bool) -> Any:
    """One lane operation over what exists so far (``made`` states created by earlier operations).

    ``leading``: every output is stacked on axis 0 (``statemap.map``'s only ``out_axes``).
    """
    srcs = _srcs(num_args, plain, made)
    targets = [("state", j) for j in plain] + [("made", k) for k in range(made)]
    kinds = ["create", "out", "out", "out", "scan"]
    if srcs:
        kinds += ["read", "read", "read", "jit"]
    if targets:
        kinds += ["write"] * 5
    if named:
        kinds += ["psum", "psum"]
    if randoms:
        kinds += ["draw", "draw", "draw", "reseed"]
    kind = draw(st.sampled_from(kinds))
    terms = st.sampled_from(["acc", "acc", "cnt", "const", *srcs])
    if kind == "read":
        return Read(draw(st.sampled_from(srcs)))
    if kind == "write":
        return Write(draw(st.sampled_from(targets)), draw(st.sampled_from(["update", "replace"])), draw(terms))
    if kind == "psum":
        return Psum()
    if kind == "scan":
        return Scan(draw(st.integers(1, 3)), draw(st.one_of(st.none(), st.sampled_from(srcs))) if srcs else None)
    if kind == "jit":
        inner = st.sampled_from(srcs).map(Read)
        if named:
            inner = st.one_of(inner, st.just(Psum()))
        return Jit(tuple(draw(st.lists(inner, min_size=1, max_size=3))))
    if kind == "draw":
        return Draw(draw(st.sampled_from(randoms)), draw(st.sampled_from(["normal", "uniform", "bernoulli", "randint"])), draw(lane_shapes))
    if kind == "reseed":
        return Reseed(draw(st.sampled_from(randoms)), draw(st.integers(0, 99)))
    if kind == "create":
        return Create(draw(lane_shapes), draw(terms))
    src = draw(st.sampled_from(["acc", "cnt", *srcs, *[("key", j) for j in randoms for _ in range(3)]]))
    if leading:
        return Out(src, 0)
    axis = draw(st.integers(-3, 2)) if src not in ("acc", "cnt") else draw(axis_in(1))
    return Out(src, None if draw(st.integers(0, 3)) == 0 else axis)


def batch_sizes(n: int) -> list[int | None]:
    """One ``batch_size`` of each kind an axis of ``n`` lanes allows (see :func:`batch_kind`)."""
    kinds = {batch_kind(n, b): b for b in (n + 1, n - 1, 2, n, 1, None) if b is None or b >= 1}
    return sorted(kinds.values(), key=lambda b: -1 if b is None else b)


def batch_kind(n: int, batch_size: int | None) -> str:
    """What ``batch_size`` is to an axis of ``n`` lanes (for hypothesis's statistics)."""
    if batch_size is None:
        return "None"
    if batch_size == 1:
        return "1"
    if batch_size > n:
        return "larger than the axis"
    return "the whole axis" if batch_size == n else "a divisor" if n % batch_size == 0 else "a remainder chunk"


@st.composite
def programs(draw: Any, which: str = "vmap", max_states: int = 4, max_ops: int = 8, batched_write: bool = False) -> Program:
    """Small stateful programs that ``which`` can express.

    ``batched_write`` adds a batched write to a broadcast state (the policy
    case). For ``'map'`` (``statemap.map``: no axis name, no ``axis_size``,
    every argument and output on axis 0) there are no collectives, arguments
    and outputs sit on axis 0, something mapped gives the axis size, and the
    program carries a ``batch_size``.
    """
    leading = which == "map"
    n = draw(st.integers(1, 4))
    calls = draw(st.sampled_from([1, 1, 2, 3]))
    args = tuple(draw(st.lists(arg_defs(leading), max_size=3)))
    states = tuple(draw(st.lists(state_defs(calls > 1, leading), min_size=1, max_size=max_states)))
    named = not leading and draw(st.booleans())
    plain = [j for j, s in enumerate(states) if s.kind != "random"]
    randoms = [j for j, s in enumerate(states) if s.kind == "random"]
    ops: list[Any] = []
    made = 0
    for _ in range(draw(st.integers(1 if batched_write else 2, max_ops))):
        op = draw(op_defs(len(args), plain, randoms, made, named, leading))
        made += isinstance(op, Create)
        ops.append(op)
    if batched_write:
        batched = [("arg", i) for i, a in enumerate(args) if a.keyword or a.axis is not None]
        batched += [("state", j) for j, s in enumerate(states) if s.kind in ("split", "argstate") and s.axis is not None]
        if not batched:
            shape = draw(lane_shapes)
            states += (StateDef("split", shape, draw(axis_in(len(shape) + 1)), draw(st.sampled_from(FORMS))),)
            batched.append(("state", len(states) - 1))
        targets = [j for j, s in enumerate(states) if s.kind == "broadcast" or (s.kind == "argstate" and s.axis is None)]
        if not targets:
            shape = draw(lane_shapes)
            out = draw(st.sampled_from([(), (), (None,), (draw(axis_in(len(shape) + 1)),)]))
            states += (StateDef("broadcast", shape, None, draw(st.sampled_from(["none", *FORMS])), out, draw(st.sampled_from(FORMS))),)
            targets.append(len(states) - 1)
        write = Write(("state", draw(st.sampled_from(targets))), draw(st.sampled_from(["update", "replace"])), draw(st.sampled_from(batched)))
        ops.insert(draw(st.integers(0, len(ops))), write)
    prog = Program(n=n, args=args, states=states, ops=tuple(ops), axis_name="i" if named else None)
    prog = dataclasses.replace(prog, ops=tuple(_clamp_outs(prog, ops)))
    if leading and needs_axis_size(prog):
        # statemap.map takes no axis_size: an argument no operation reads gives it.
        prog = dataclasses.replace(prog, args=(*args, Arg((), 0)))
    groups = len({entry_axis(s) if s.kind != "argstate" else s.axis for s in states if s.select != "none"})
    return dataclasses.replace(
        prog,
        policy=draw(st.sampled_from(["raise", "warn", "ignore"])),
        axis_size=not leading and (needs_axis_size(prog) or draw(st.booleans())),
        in_axes_int=draw(st.booleans()),
        out_axes_int=draw(st.booleans()),
        in_order=tuple(draw(st.permutations(range(groups)))),
        bare_in=draw(st.booleans()),
        bare_out=draw(st.booleans()),
        shadow_in=draw(st.booleans()),
        shadow_out=draw(st.booleans()),
        calls=calls,
        mutate=draw(st.sampled_from(["no", "values", "shapes"])),
        explain=draw(st.booleans()),
        data_seed=draw(st.integers(0, 2**16)),
        pack=draw(st.booleans()),
        batch_size=draw(st.sampled_from(batch_sizes(n))) if leading else None,
    )


def lane_rank(prog: Program, src: Any, made_shapes: list[tuple[int, ...]]) -> int:
    if src in ("acc", "cnt"):
        return 0
    kind, i = src
    if kind == "arg":
        return len(prog.args[i].shape)
    if kind == "made":
        return len(made_shapes[i])
    if kind == "key":
        return len(key_lane_shape(prog.states[i].typed))
    return prog.states[i].min_rank


def _clamp_outs(prog: Program, ops: Sequence[Any]) -> list[Any]:
    """Out axes in range for the source's lane rank (call 1; later calls only add rank)."""
    made_shapes: list[tuple[int, ...]] = []
    fixed = []
    for op in ops:
        if isinstance(op, Create):
            made_shapes.append(op.shape)
        if isinstance(op, Out) and op.axis is not None:
            r = lane_rank(prog, op.src, made_shapes) + 1
            if not -r <= op.axis < r:
                op = Out(op.src, op.axis % r)
        fixed.append(op)
    return fixed


# ---------------------------------------------------------------------------
# Nesting: a generated program under statemap.vmap, itself under statemap.vmap or pmap.


@dataclass(frozen=True)
class Nested:
    """``outer(lambda: inner(*args))``: ``inner`` a statemap.vmap of ``prog``; the outer map
    has ``m`` lanes, splits the states ``outer_split`` on axis 0 (their values gain a
    leading axis of size m), marks ``outer_broadcast`` broadcast (``{None: ...}``) and
    gives every other RandomState the inner program touches a key per outer lane."""

    prog: Program
    m: int
    outer_split: tuple[int, ...]
    outer_policy: str = "raise"
    outer_broadcast: tuple[int, ...] = ()
    batch_size: int | None = None  # an outer statemap.map's

    def outer_lane_key(self, j: int) -> bool:
        return self.prog.states[j].kind == "random" and j not in self.outer_split + self.outer_broadcast


def outer_batched(nest: Nested) -> dict[int, bool]:
    """Which states vary along the outer axis on entry to the outer lane."""
    return {j: j in nest.outer_split or nest.outer_lane_key(j) for j in range(len(nest.prog.states))}


def nested_values(nest: Nested) -> dict[int, Any]:
    """Initial values: outer-split states stack one inner value per outer lane."""
    per_lane = []
    for lane in range(nest.m):
        states = tuple(dataclasses.replace(s, seed=s.seed + lane) for s in nest.prog.states)
        per_lane.append(initial_values(dataclasses.replace(nest.prog, states=states, data_seed=nest.prog.data_seed + 17 * lane)))
    values = dict(per_lane[0])
    for j in nest.outer_split:
        values[j] = jax.tree.map(lambda *xs: jnp.stack(xs), *[v[j] for v in per_lane])
    return values


def make_nested(nest: Nested, states: list[statemap.State], args: list[Any], which: str) -> Callable[[], Any]:
    """The outer call, taking no arguments."""
    inner = make_mapping(nest.prog, states, "vmap")
    pos, kw = call_arguments(nest.prog, states, args)

    def outer_fn(*_: Any) -> Any:
        return inner(*pos, **kw)

    axes = {0: [states[j] for j in nest.outer_split], None: [states[j] for j in nest.outer_broadcast]}
    keywords: dict[str, Any] = {
        "state_in_axes": {k: v for k, v in axes.items() if v} or None,
        "unexpected_out_state_mapping": nest.outer_policy,
    }
    if which == "map":  # no axis_size: an argument the lanes ignore gives it
        return functools.partial(statemap.LaxMapMapping(outer_fn, batch_size=nest.batch_size, **keywords), np.zeros(nest.m))
    keywords["axis_size"] = nest.m
    if which == "vmap":
        return statemap.vmap(outer_fn, **keywords)
    return statemap.pmap(outer_fn, "outer", **keywords)


def nested_oracle(nest: Nested, values: dict[int, Any], args: list[Any], which: str) -> Expected:
    """The inner oracle (itself a jax.vmap) under an outer ``jax.vmap`` (``jax.pmap`` for ``which='pmap'``)."""
    prog, m = nest.prog, nest.m
    inner = oracle(prog, {j: jax.tree.map(lambda x: x[0], v) if j in nest.outer_split else v for j, v in values.items()}, args, "vmap")
    if inner.rejection:
        return inner  # the inner call refuses while the outer one traces
    # The outer map keys every RandomState the inner program touches (reads included).
    outer_keyed = {j for j in analyse(prog).touched if nest.outer_lane_key(j)}
    changed = sorted(inner.written | inner.advanced | outer_keyed)
    outer_flags = outer_batched(nest)
    info = analyse(prog, initial=outer_flags, args_b=[False] * len(prog.args), psum_clears=False)
    exits: dict[int, str] = {}
    for j in changed:
        if nest.outer_lane_key(j):
            exits[j] = "advanced"  # an outer per-lane key: advanced once by the outer call
        elif j in nest.outer_split:
            exits[j] = "stacked"
        elif (outer_flags[j] if j in inner.advanced else info.state_batched[j]):
            exits[j] = {"raise": "refused", "warn": "warned", "ignore": "stacked"}[nest.outer_policy]
        else:
            exits[j] = "as_is"
    expected = Expected(warned=list(inner.warned), written=set(changed))
    refused = [j for j, how in exits.items() if how == "refused"]
    if refused:
        expected.rejection, expected.refused = "state", refused  # after the inner call's warnings
        return expected
    expected.outer_warned = [j for j, how in exits.items() if how == "warned"]

    new_parents: dict[int, Any] = {}
    inputs: dict[int, Any] = {}
    in_axes: dict[int, Any] = {}
    for j, v in values.items():
        if exits.get(j) == "advanced":
            new_parents[j], base = jax.random.split(v)
            inputs[j], in_axes[j] = jax.random.split(base, m), 0
        elif j in nest.outer_split:
            inputs[j], in_axes[j] = v, 0
        else:
            inputs[j], in_axes[j] = v, None

    def outer_lane(vals: dict[int, Any]) -> Any:
        got = oracle(prog, vals, args, "vmap")
        return got.outs, got.made, {j: got.values[j] for j in changed if exits[j] != "advanced"}

    out_axes = (0, 0, {j: None if exits[j] == "as_is" else 0 for j in changed if exits[j] != "advanced"})
    if not on_devices(which):
        outs, made, new = jax.jit(jax.vmap(outer_lane, in_axes=(in_axes,), out_axes=out_axes, axis_size=m))(inputs)
    else:
        inputs = {j: jax.tree.map(to_host, v) for j, v in inputs.items()}
        program = jax.pmap(lambda _, vals: outer_lane(vals), axis_name="outer", in_axes=(0, in_axes), out_axes=out_axes)
        outs, made, new = jax.block_until_ready(program(np.arange(m), inputs))
    expected.outs, expected.made = tuple(outs), tuple(made)
    expected.values = {**values, **new, **new_parents}
    return expected


@st.composite
def nested_programs(draw: Any) -> Nested:
    prog = draw(programs(max_states=3, max_ops=6))
    states = []
    for s in prog.states:
        if s.kind == "argstate":  # the outer lane closes over everything: no State arguments
            s = dataclasses.replace(s, kind="split" if s.axis is not None else "broadcast", select="instance")
        states.append(s)
    prog = dataclasses.replace(prog, states=tuple(states), calls=1, mutate="no", explain=False)
    prog = dataclasses.replace(prog, axis_size=prog.axis_size or needs_axis_size(prog))
    groups = len({entry_axis(s) for s in prog.states if s.select != "none"})
    prog = dataclasses.replace(prog, in_order=tuple(draw(st.permutations(range(groups)))))
    split = tuple(j for j in range(len(states)) if draw(st.integers(0, 2)) > 0)
    # Stacked keys are no key: the outer map splits them or broadcasts them explicitly.
    broadcast = tuple(
        j
        for j, s in enumerate(states)
        if j not in split and ((s.kind == "random" and s.mode == "split") or draw(st.integers(0, 3)) == 0)
    )
    sources = [j for j in split if states[j].kind != "random"]
    targets = [j for j, s in enumerate(states) if s.kind != "random" and j not in split]
    if draw(st.booleans()):
        # A write that varies along the outer axis into a state the outer map does not split.
        if not sources:
            states.append(StateDef("broadcast", draw(lane_shapes)))
            split += (len(states) - 1,)
            sources.append(len(states) - 1)
        if not targets:
            states.append(StateDef("broadcast", draw(lane_shapes)))
            targets.append(len(states) - 1)
        prog = dataclasses.replace(prog, states=tuple(states))
        write = Write(("state", draw(st.sampled_from(targets))), draw(st.sampled_from(["update", "replace"])), ("state", draw(st.sampled_from(sources))))
        ops = list(prog.ops)
        ops.insert(draw(st.integers(0, len(ops))), write)
        prog = dataclasses.replace(prog, ops=tuple(ops))
        prog = dataclasses.replace(prog, axis_size=prog.axis_size or needs_axis_size(prog))
    policy = draw(st.sampled_from(["raise", "warn", "ignore"]))
    m = draw(st.integers(1, 3))
    return Nested(prog, m, split, policy, broadcast, draw(st.sampled_from(batch_sizes(m))))


# ---------------------------------------------------------------------------
# Plan-key programs: between calls the host changes what a plan's key must
# cover (weak and strong scalars, static values of equal value and different
# type, None state values, the State object passed as an argument), and every
# warm call must agree with a cold call of a fresh mapping and with jax.vmap.

ARG_DTYPES = ("int8", "int32", "bfloat16", "float32")
STATIC_VALUES = (2, 2.0, True, 1, 1.0, False)


@dataclass(frozen=True)
class KeyState:
    """A scalar state: its kind ('int' or 'float'), its first value's form, whether the lane writes it.

    Forms: 'weak' (a Python number), 'strong' (a JAX scalar of the kind's
    32-bit dtype) or 'none' (the lane initialises it lazily).
    """

    kind: str
    form: str
    writes: bool


@dataclass(frozen=True)
class KeyProgram:
    """A lane over scalar states and a static argument, called once, then once per change.

    Each change alters one thing the plan key must cover and keeps the rest,
    so the warm call finds the previous plan and must not reuse it wrongly:
    ``('form', j, form)`` gives state j a new value of that form, ``('static',
    value)`` a new static value (often equal to the old one, of another type),
    ``('swap',)`` a new State object as the argument state, ``('same',)``
    nothing (the states keep what the last call wrote).
    """

    n: int
    arg_dtype: str
    states: tuple[KeyState, ...]
    static: Any
    changes: tuple[tuple[Any, ...], ...]
    by_name: bool  # the static argument is passed by keyword (``static_argnames``)


@st.composite
def key_programs(draw: Any) -> KeyProgram:
    forms = st.sampled_from(["weak", "strong", "none"])
    states = tuple(
        KeyState(draw(st.sampled_from(["int", "float"])), draw(forms), draw(st.booleans()))
        for _ in range(draw(st.integers(1, 2)))
    )
    change = st.one_of(
        st.tuples(st.just("form"), st.integers(0, len(states) - 1), forms),
        st.tuples(st.just("static"), st.sampled_from(STATIC_VALUES)),
        st.sampled_from([("swap",), ("same",)]),
    )
    return KeyProgram(
        n=draw(st.integers(1, 3)),
        arg_dtype=draw(st.sampled_from(ARG_DTYPES)),
        states=states,
        static=draw(st.sampled_from(STATIC_VALUES)),
        changes=tuple(draw(st.lists(change, min_size=1, max_size=3))),
        by_name=draw(st.booleans()),
    )


def key_value(state: KeyState, form: str, call: int) -> Any:
    """A value of ``form`` for ``state``, different on every call."""
    if form == "none":
        return None
    number = call + 3 if state.kind == "int" else call + 0.5
    if form == "weak":
        return number
    return jnp.int32(number) if state.kind == "int" else jnp.float32(number)


def key_lane(prog: KeyProgram, x: Any, k: Any, values: Sequence[Any], arg_value: Any) -> tuple[Any, list[Any], Any]:
    """One lane as a pure function: (output, new state values, new argument-state value).

    Python control flow on ``None`` and on the static ``k`` (``k is True``)
    is decided at trace time, as in the stateful version.
    """
    acc = x
    new = []
    for state, value in zip(prog.states, values):
        if value is None:
            value = jnp.zeros((), jnp.int32 if state.kind == "int" else jnp.float32)
        acc = acc + value
        new.append(value + 1 if state.writes else value)
    acc = acc * 2 if k is True else acc * k
    return acc, new, arg_value * 2 + 1


def key_function(prog: KeyProgram, states: Sequence[statemap.State]) -> Any:
    """The stateful lane function over ``states``; the argument state comes last."""

    def fn(x: Any, k: Any, s_arg: statemap.State) -> Any:
        values = []
        for state, s in zip(prog.states, states):
            if s.value is None:
                s.value = jnp.zeros((), jnp.int32 if state.kind == "int" else jnp.float32)
            values.append(s.value)
        out, new, new_arg = key_lane(prog, x, k, values, s_arg.value)
        for state, s, value in zip(prog.states, states, new):
            if state.writes:
                s.value = value
        s_arg.value = new_arg
        return out

    def by_keyword(x: Any, s_arg: statemap.State, *, k: Any) -> Any:
        return fn(x, k, s_arg)

    return by_keyword if prog.by_name else fn


def key_mapping(prog: KeyProgram, states: Sequence[statemap.State]) -> Any:
    fn = key_function(prog, states)
    if prog.by_name:
        return statemap.vmap(fn, in_axes=(0, None), static_argnames="k")
    return statemap.vmap(fn, in_axes=(0, None, None), static_argnums=1)


def key_call(prog: KeyProgram, mapping: Any, x: Any, k: Any, s_arg: statemap.State) -> Any:
    return mapping(x, s_arg, k=k) if prog.by_name else mapping(x, k, s_arg)


def key_oracle(prog: KeyProgram, x: Any, k: Any, values: Sequence[Any], arg_value: Any) -> tuple[Any, list[Any], Any]:
    """``jax.vmap`` of the pure lane, the state values passed unmapped."""
    return jax.vmap(lambda x, values, a: key_lane(prog, x, k, values, a), in_axes=(0, None, None), out_axes=(0, None, None))(
        x, list(values), arg_value
    )


def key_argument(prog: KeyProgram, call: int) -> Any:
    return jnp.arange(prog.n).astype(prog.arg_dtype) + call
