"""contrib/grafana/dashboards: four dashboards whose every query names only metrics metald
exports (the names are read from a real exposition, tests/unit/test_prometheus_metrics.py's
fully exercised one), all through the datasource variable. A real Prometheus runs every one
of them in tests/e2e/test_prometheus.py."""

from __future__ import annotations

import asyncio
import re

from grafana_dashboards import dashboards, queries
from prometheus_client.parser import text_string_to_metric_families
from test_prometheus_metrics import _exercised

# PromQL's own words (functions, aggregations, keywords) that a query may hold besides names.
PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "by", "without", "rate", "increase", "irate",
    "histogram_quantile", "le", "time", "clamp_min", "and", "or", "unless", "on", "ignoring",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTORS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_WORDS = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def exported_names() -> set[str]:
    metrics, _ = _exercised()
    text = asyncio.run(metrics.exposition()).decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def metric_names(promql: str) -> set[str]:
    bare = _RANGES.sub("", _SELECTORS.sub("", _STRINGS.sub("", promql)))
    # Grouping label lists: `by (le, method)`.
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", bare)
    words = set(_WORDS.findall(bare)) - PROMQL_WORDS
    return {w for w in words if not re.fullmatch(r"[0-9.e]+", w)}


def test_the_four_dashboards_are_there() -> None:
    titles = {board["title"] for board in dashboards().values()}
    assert titles == {
        "metald / VM operations",
        "metald / host capacity",
        "metald / metering and billing",
        "metald / security",
    }
    uids = [board["uid"] for board in dashboards().values()]
    assert len(set(uids)) == len(uids)


def test_every_query_uses_metrics_metald_exports() -> None:
    exported = exported_names()
    found = queries()
    assert len(found) >= 40
    for q in found:
        names = metric_names(q.promql)
        assert names, f"{q.dashboard} / {q.where}: no metric in {q.promql!r}"
        unknown = names - exported
        assert not unknown, f"{q.dashboard} / {q.where}: {sorted(unknown)} are not exported"


def test_every_metric_family_of_metald_is_on_some_dashboard() -> None:
    used = set().union(*(metric_names(q.promql) for q in queries()))
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}
    exported = {n for n in exported_names() if n.startswith("metald_")}
    missing = {n for n in exported if re.sub(r"_(bucket|sum|count)$", "", n) not in families}
    assert not missing, f"exported but on no dashboard: {sorted(missing)}"


def test_panels_use_the_datasource_variable() -> None:
    for name, board in dashboards().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", (name, panel["title"])
