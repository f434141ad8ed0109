"""Sphinx configuration for the statemap docs."""

import os
import sys

# Document the checkout, installed or not.
sys.path.insert(0, os.path.abspath(".."))

project = "statemap"
author = "statemap developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

exclude_patterns = ["_build"]
nitpicky = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Keep the aliases readable in signatures instead of expanding the unions.
autodoc_type_aliases = {"Filter": "statemap.filters.Filter", "Predicate": "statemap.filters.Predicate"}

napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Every plain ``>>>`` block (in pages and in docstrings pulled in by autodoc)
# is a test of the 'default' group, run by ``sphinx-build -b doctest``.
doctest_test_doctest_blocks = "default"
doctest_global_setup = "import jax, jax.numpy as jnp, statemap"

html_theme = "alabaster"
