"""Test setup: deterministic, single-device CPU JAX (multi-device tests use subprocesses)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
