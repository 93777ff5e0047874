"""Benchmarks: each module prints one JSON line and a table (docs/benchmarks.md).

Run from the repository root as `python -m benchmarks.NAME` or
`python benchmarks/NAME.py`; both find `csctr`, `configs` and `benchmarks`
as installed packages (`pip install -e .`, setup.py).
"""
