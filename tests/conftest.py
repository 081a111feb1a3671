"""Shared pytest configuration: run JAX on the CPU with deterministic settings."""
import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

REFERENCE_DIR = pathlib.Path(__file__).parent / "data"
