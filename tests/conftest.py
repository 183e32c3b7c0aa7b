"""Shared fixtures and the Hypothesis profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, settings

from fluentforward.config import ServerConfig, parse_listen
from fluentforward.server import serve
from fluentforward.spool import Spool, SpoolSettings

# Deadlines and speed health checks measure the machine, not the code: CI shares two cores.
_RELAXED = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", settings(deadline=None, suppress_health_check=_RELAXED, max_examples=200))
settings.register_profile("dev", settings(deadline=None, suppress_health_check=_RELAXED, max_examples=100))
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# `--delivery-processes` defaults to `auto` (a delivery child per usable CPU, up to 4). The suite starts
# many servers with --loki-url, in process and as subprocesses that inherit this environment: pin one
# lane unless a test says otherwise (a flag, or an env of its own, wins over this).
os.environ["FLUENTFORWARD_DELIVERY_PROCESSES"] = "1"

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"

FLUENT_BIT = DATA / "fluent-bit-5.1.1"
TRACE_VECTORS = DATA / "trace-ids" / "vectors.json"


@pytest.fixture
async def server(tmp_path, nursery):
    """Start in-process servers (127.0.0.1 port 0 unless ``listen`` is given), each with a fresh spool;
    yields ``start(**config overrides) -> ServerState``."""
    states = []

    async def start(**overrides):
        spool = Spool.open(SpoolSettings(directory=tmp_path / f"spool{len(states)}"))
        overrides.setdefault("listen", parse_listen("127.0.0.1:0"))
        config = ServerConfig(spool=spool.settings, **overrides)
        try:
            state = await nursery.start(serve, config, spool)
        except BaseException:
            spool.close()
            raise
        states.append(state)
        return state

    yield start
    nursery.cancel_scope.cancel()
    for state in states:
        state.spool.close()


@pytest.fixture(autouse=True)
def _reset_structlog():
    """A CLI test configures structlog for a captured stream; later tests start from the defaults."""
    yield
    structlog.reset_defaults()
