import pytest

import statemap
from statemap import errors


def test_all_is_pinned():
    assert errors.__all__ == ["BatchAxisError", "StateTypeError", "StatemapError"]


def test_hierarchy():
    assert issubclass(errors.StatemapError, Exception)
    assert issubclass(errors.BatchAxisError, errors.StatemapError)
    assert issubclass(errors.BatchAxisError, ValueError)
    assert issubclass(errors.StateTypeError, errors.StatemapError)
    assert issubclass(errors.StateTypeError, TypeError)


@pytest.mark.parametrize("caught", [errors.BatchAxisError, errors.StatemapError, ValueError])
def test_batch_axis_error_is_caught_as(caught):
    with pytest.raises(caught, match="names the state"):
        raise errors.BatchAxisError("names the state")


def test_statemap_error_is_not_a_value_error():
    assert not issubclass(errors.StatemapError, ValueError)


def test_top_level_export_is_the_same_class():
    assert statemap.BatchAxisError is errors.BatchAxisError
