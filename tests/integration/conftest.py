"""Shared fixtures for the integration tests: heavy resources are started once per session."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def ray_local(scratch: pathlib.Path):
    """A local Ray on 2 CPUs, its temp dir under the session scratch, shut down at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(scratch / "ray"))
    yield ray
    ray.shutdown()
