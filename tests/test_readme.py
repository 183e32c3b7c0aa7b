"""The README's configuration reference matches the code, so it cannot drift."""

from __future__ import annotations

import re

import typer

from fluentforward.cli import app
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def _serve_params():
    command = typer.main.get_command(app).commands["serve"]
    return {p.name: p for p in command.params if not getattr(p, "hidden", False)}


def _reference_rows() -> dict[str, str]:
    """Option -> default cell, from the table under 'Configuration reference'."""
    section = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        for option in re.findall(r"`(--[a-z0-9-]+)", cells[0]):
            rows[option] = cells[1]
    return rows


def test_every_serve_option_is_documented():
    """Each option of `fluentforward serve` has a row in the README's reference, and no row is stale."""
    documented = set(_reference_rows())
    options = set()
    for param in _serve_params().values():
        options.update(o for o in param.opts if o.startswith("--"))
        options.update(o for o in getattr(param, "secondary_opts", []) if o.startswith("--"))
    missing = {o for o in options if o not in documented and not o.startswith("--no-")}
    assert not missing, f"serve options missing from the README: {sorted(missing)}"
    stale = documented - options
    assert not stale, f"README documents options that do not exist: {sorted(stale)}"


def test_documented_defaults_match_the_code():
    """A default written as a single `value` in the README equals the option's default."""
    params = _serve_params()
    by_option = {o: p for p in params.values() for o in p.opts}
    checked = 0
    for option, cell in _reference_rows().items():
        match = re.fullmatch(r"`([^`]*)`", cell)
        param = by_option.get(option)
        if match is None or param is None or isinstance(param.default, bool):
            continue
        default = param.default
        assert str(default) in {match.group(1), _bytes(match.group(1))}, (option, default, cell)
        checked += 1
    assert checked >= 15


def _bytes(text: str) -> str:
    units = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    for unit, factor in units.items():
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return str(int(text[: -len(unit)]) * factor)
    return text
