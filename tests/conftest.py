"""Shared fixtures and the Hypothesis profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, settings

# Deadlines and speed health checks measure the machine, not the code: CI shares two cores.
_RELAXED = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", settings(deadline=None, suppress_health_check=_RELAXED, max_examples=200))
settings.register_profile("dev", settings(deadline=None, suppress_health_check=_RELAXED, max_examples=100))
settings.load_profile("ci" if os.environ.get("CI") else "dev")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"

FLUENT_BIT = DATA / "fluent-bit-5.1.1"
TRACE_VECTORS = DATA / "trace-ids" / "vectors.json"


@pytest.fixture(autouse=True)
def _reset_structlog():
    """A CLI test configures structlog for a captured stream; later tests start from the defaults."""
    yield
    structlog.reset_defaults()
