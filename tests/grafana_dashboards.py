"""The PromQL of contrib/grafana/dashboards/*.json, as Prometheus can run it: every panel
target's `expr` and every query variable's metric selector, with Grafana's variables
replaced by what "All" and a fixed window give. Shared by the unit test (which metrics the
queries name) and the e2e test (a real Prometheus runs them)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parents[1] / "contrib" / "grafana" / "dashboards"

# Grafana's built-in and the dashboards' own variables, as Prometheus is asked them: "All"
# of a multi-value variable is its allValue (.*); a rate window covers a short test run.
SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "15s",
    "$__range": "1h",
    "$instance": ".*",
    "$backend": ".*",
}
_LABEL_VALUES = re.compile(r"^label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\)$")


@dataclass(frozen=True)
class Query:
    dashboard: str
    where: str  # the panel title or the variable's name
    promql: str  # as Prometheus is asked it
    label: str | None = None  # a variable's: the label whose values it lists


def substitute(expr: str) -> str:
    for name in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(name, SUBSTITUTIONS[name])
    if "$" in expr:
        raise ValueError(f"a variable without a substitution in {expr!r}")
    return expr


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def queries() -> list[Query]:
    found = []
    for name, board in dashboards().items():
        for var in board.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = _LABEL_VALUES.match(query.strip())
            if m is None:
                raise ValueError(f"{name}: variable {var['name']}: not label_values(): {query}")
            found.append(Query(name, f"${var['name']}", substitute(m.group(1)), m.group(2)))
        for panel in _panels(board.get("panels", [])):
            for target in panel.get("targets", []):
                found.append(Query(name, panel["title"], substitute(target["expr"])))
    return found
