"""statemap: JAX's mapping transforms for functions that read and write mutable state."""

from . import errors as errors
from . import filters as filters
from . import random as random
from ._branch import cond as cond
from ._branch import switch as switch
from ._grad import grad as grad
from ._grad import value_and_grad as value_and_grad
from ._jit import JitTransform as JitTransform
from ._jit import jit as jit
from ._laxmap import LaxMapMapping as LaxMapMapping
from ._laxmap import map as map
from ._loops import for_loop as for_loop
from ._loops import fori_loop as fori_loop
from ._loops import scan as scan
from ._loops import while_loop as while_loop
from ._mapping import MapSpec as MapSpec
from ._mapping import StatefulMapping as StatefulMapping
from ._pmap import PMapMapping as PMapMapping
from ._pmap import pmap as pmap
from ._random import RandomState as RandomState
from ._shard_map import ShardMapMapping as ShardMapMapping
from ._shard_map import shard_map as shard_map
from ._state import HiddenState as HiddenState
from ._state import LongTermState as LongTermState
from ._state import ParamState as ParamState
from ._state import ShortTermState as ShortTermState
from ._state import State as State
from ._trace import StateTrace as StateTrace
from ._transform import StatefulTransform as StatefulTransform
from ._vmap import VMapMapping as VMapMapping
from ._vmap import vmap as vmap
from .errors import BatchAxisError as BatchAxisError
from .errors import StatemapError as StatemapError

__version__ = "0.2.0"

vmap2 = vmap
pmap2 = pmap

__all__ = [
    "BatchAxisError",
    "HiddenState",
    "JitTransform",
    "LaxMapMapping",
    "LongTermState",
    "MapSpec",
    "PMapMapping",
    "ParamState",
    "RandomState",
    "ShardMapMapping",
    "ShortTermState",
    "State",
    "StateTrace",
    "StatefulMapping",
    "StatefulTransform",
    "StatemapError",
    "VMapMapping",
    "cond",
    "errors",
    "filters",
    "for_loop",
    "fori_loop",
    "grad",
    "jit",
    "map",
    "pmap",
    "pmap2",
    "random",
    "scan",
    "shard_map",
    "switch",
    "value_and_grad",
    "vmap",
    "vmap2",
    "while_loop",
]
