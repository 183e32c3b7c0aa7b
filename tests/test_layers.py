"""The pure ring imports no I/O framework (DESIGN: three rings)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "fluentforward"
PURE = [
    *sorted((PKG / "protocol").glob("*.py")),
    PKG / "ids.py",
    PKG / "records.py",
    PKG / "spool" / "_format.py",
]
FORBIDDEN = {"trio", "httpx", "structlog", "socket", "asyncio"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(PKG)))
def test_pure_modules_do_no_io(path):
    """Protocol, id, record and spool-format modules never import trio, httpx, structlog or sockets."""
    assert not (_imports(path) & FORBIDDEN)
