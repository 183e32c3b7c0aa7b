"""Benchmarks for fluentforward (`make bench`); never part of `make test`."""

from __future__ import annotations
