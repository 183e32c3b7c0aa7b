"""`python -m fluentforward` runs the CLI."""

from __future__ import annotations

from fluentforward.cli import main

main()
