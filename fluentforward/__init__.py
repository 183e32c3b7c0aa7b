"""fluentforward: Fluent Forward receiver with a durable spool, W3C trace ids and Loki shipping."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
