"""Command-line interface (placeholder until the serve command lands)."""

from __future__ import annotations


def main() -> None:
    """Entry point of the ``fluentforward`` console script."""
