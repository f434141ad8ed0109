"""statemap's benchmarks: ``python -m benchmarks`` times statemap against raw JAX and its peers.

See ``benchmarks/README.md``. The ``bench_*.py`` scripts beside this package
are run as files (``python benchmarks/bench_vmap.py``).
"""
