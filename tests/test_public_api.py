import statemap

EXPECTED_ALL = [
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


def test_all_is_pinned():
    assert statemap.__all__ == EXPECTED_ALL


def test_all_is_sorted_and_unique():
    assert statemap.__all__ == sorted(set(statemap.__all__))


def test_every_name_in_all_exists_and_is_documented():
    for name in statemap.__all__:
        obj = getattr(statemap, name)
        assert obj.__doc__ and obj.__doc__.strip(), name


def test_no_public_name_outside_all():
    # statemap.launch is a script module (python -m statemap.launch): it shows
    # up here only once some code has imported it.
    public = {name for name in dir(statemap) if not name.startswith("_")} - {"launch"}
    # Everything public at the top level is in __all__ (submodules imported by
    # statemap itself are the public modules, also listed).
    assert public == set(EXPECTED_ALL)


def test_aliases_and_reexports_are_the_same_objects():
    assert statemap.vmap2 is statemap.vmap
    assert statemap.pmap2 is statemap.pmap
    assert statemap.BatchAxisError is statemap.errors.BatchAxisError
    assert statemap.StatemapError is statemap.errors.StatemapError
    assert issubclass(statemap.VMapMapping, statemap.StatefulMapping)
    assert issubclass(statemap.PMapMapping, statemap.StatefulMapping)
    assert issubclass(statemap.RandomState, statemap.State)


def test_public_modules():
    import statemap.errors
    import statemap.filters
    import statemap.random

    assert statemap.filters.__name__ == "statemap.filters"
    assert statemap.random.__name__ == "statemap.random"
    assert statemap.errors.__name__ == "statemap.errors"


def test_version_matches_the_package_metadata():
    from importlib.metadata import version

    assert statemap.__version__ == version("statemap")
