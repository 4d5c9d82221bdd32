"""The Grafana dashboards and the Prometheus alert rules: the committed dashboards are what
``deploy.observability.grafana`` generates, every PromQL expression names only metrics,
labels and functions that exist, the rules file is well formed (and, with ``promtool`` on
PATH, accepted by Prometheus and firing as intended on synthetic series)."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from deploy.observability import grafana

REPO = Path(__file__).resolve().parents[3]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DOCS = REPO / "docs" / "observability.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH")

# Every production module that defines Prometheus metrics; the completeness test below
# fails when a new one appears that is not listed here.
METRIC_MODULES = (
    "serving.metrics",
    "serving.publisher",
    "serving.routing",
    "serving.policies",
    "feedback.ingest.consumer",
    "deploy.canary.controller",
    "trainer.rounds.training_round",
    "trainer.reward.trainer",
)
# Labels Prometheus attaches to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})


# --- a small PromQL tokenizer ---------------------------------------------------------------
def _words(text: str) -> frozenset[str]:
    """The whitespace-separated words of ``text`` (long name lists read better as text)."""
    return frozenset(text.split())


AGGREGATIONS = _words(
    """sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk
    limit_ratio"""
)
FUNCTIONS = _words(
    """abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil
    changes clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week
    day_of_year days_in_month deg delta deriv double_exponential_smoothing end exp floor
    histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev
    histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time
    minute month pi predict_linear present_over_time quantile_over_time rad rate resets
    round scalar sgn sin sinh sort sort_by_label sort_by_label_desc sort_desc sqrt start
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year"""
)
# Keywords followed by a parenthesised list of label names (group_left/right: optionally).
GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*")
# Numbers, durations (5m, 1h30m), hex, exponents (1e-3).
_NUMBER = re.compile(r"[0-9.]+(?:[eE][+-]?[0-9]+)?[A-Za-z0-9_.]*")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z0-9_]+")


@dataclass
class PromQLRefs:
    """What an expression names: metrics, functions and aggregations, label names in
    ``{...}`` matchers (with the metric they select, None for a bare ``{...}``), and label
    names in ``by``/``without``/``on``/``ignoring``/``group_*`` lists."""

    metrics: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    matchers: set[tuple[str | None, str]] = field(default_factory=set)
    grouping: set[str] = field(default_factory=set)


def _skip_string(expr: str, i: int) -> int:
    """The index after the string literal starting at ``expr[i]`` (a quote character)."""
    quote, i = expr[i], i + 1
    while i < len(expr) and expr[i] != quote:
        i += 2 if expr[i] == "\\" and quote != "`" else 1
    return i + 1


def _next_char(expr: str, i: int) -> tuple[str, int]:
    """The first non-space character at or after ``i`` and its index ('' at the end)."""
    while i < len(expr) and expr[i].isspace():
        i += 1
    return (expr[i] if i < len(expr) else ""), i


def _label_list(expr: str, i: int) -> tuple[list[str], int]:
    """Label names of the ``( a, b )`` list starting at ``expr[i] == '('``, and the index
    after its ``)``."""
    end = expr.index(")", i)
    names = [n.strip() for n in expr[i + 1 : end].split(",") if n.strip()]
    return names, end + 1


def _matchers(expr: str, i: int) -> tuple[list[str], int]:
    """Label names of the ``{...}`` matchers starting at ``expr[i] == '{'``, and the index
    after the ``}``. Values are string literals, so a brace inside one does not end it."""
    names, i = [], i + 1
    while True:
        char, i = _next_char(expr, i)
        if char == "}":
            return names, i + 1
        if char == ",":
            i += 1
            continue
        m = _MATCHER.match(expr, i)
        if m is None:
            raise ValueError(f"bad label matcher at {i} in {expr!r}")
        names.append(m.group(1))
        i = _skip_string(expr, m.end())


def promql_refs(expr: str) -> PromQLRefs:
    """Tokenize ``expr`` just enough to tell metric names from everything else: strings,
    ``[...]`` ranges (durations, ``$__rate_interval``), numbers, keywords, functions and
    aggregations (an identifier followed by ``(``, or an aggregation followed by
    ``by``/``without``), label lists and matchers. Raises ValueError on a malformed
    matcher."""
    refs = PromQLRefs()
    last_metric: str | None = None  # the selector a following `{` belongs to
    i = 0
    while i < len(expr):
        char = expr[i]
        if char.isspace():
            i += 1
            continue
        if char == "#":  # a comment runs to the end of the line
            newline = expr.find("\n", i)
            i = len(expr) if newline < 0 else newline
            continue
        if char in "\"'`":
            i, last_metric = _skip_string(expr, i), None
        elif char == "[":
            i = expr.index("]", i) + 1
        elif char == "{":
            names, i = _matchers(expr, i)
            refs.matchers.update((last_metric, name) for name in names)
            last_metric = None
        elif char.isdigit() or (char == "." and expr[i + 1 : i + 2].isdigit()):
            m = _NUMBER.match(expr, i)
            assert m is not None  # the first character matches
            i, last_metric = m.end(), None
        elif char == "$":  # a Grafana variable outside a range
            m = _VARIABLE.match(expr, i)
            i, last_metric = (m.end() if m else i + 1), None
        elif (m := _IDENT.match(expr, i)) is not None:
            i, last_metric = _identifier(expr, m.group(), m.end(), refs)
        else:  # operators, parentheses, commas, @
            i, last_metric = i + 1, None
    return refs


def _identifier(expr: str, name: str, end: int, refs: PromQLRefs) -> tuple[int, str | None]:
    """Classify the identifier ``name`` ending at ``end``; record it in ``refs``. Returns
    where to go on and the metric a following ``{`` would select (None if not a metric)."""
    after, j = _next_char(expr, end)
    if name in GROUPING:
        if after == "(":
            labels, j = _label_list(expr, j)
            refs.grouping.update(labels)
            return j, None
        return end, None
    if name in KEYWORDS:
        return end, None
    if name in AGGREGATIONS and (after == "(" or _IDENT.match(expr, j) is not None):
        refs.functions.add(name)
        return end, None
    if after == "(":
        refs.functions.add(name)
        return end, None
    refs.metrics.add(name)
    return end, name


# --- what the code exports ------------------------------------------------------------------
def _sample_names(name: str, kind: str) -> list[str]:
    """The sample names a metric family of ``kind`` exposes (prometheus_client's naming):
    a labelled family with no child yet exposes no samples, so they are derived here."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "gaugehistogram": ["_bucket", "_gcount", "_gsum"],
        "summary": ["", "_count", "_sum", "_created"],
        "info": ["_info"],
    }.get(kind, [""])
    return [name + suffix for suffix in suffixes]


def exported_metrics() -> dict[str, frozenset[str]]:
    """Every sample name this code base's processes export -> the label names it can
    carry (its own, ``job``/``instance`` from the scrape, ``le`` on buckets), plus ``up``."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    labels: dict[str, frozenset[str]] = {"up": TARGET_LABELS}
    for family in REGISTRY.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, TARGET_LABELS | set(sample.labels))
        for name in _sample_names(family.name, family.type):
            labels.setdefault(name, TARGET_LABELS)
    for module in METRIC_MODULES:
        for value in vars(importlib.import_module(module)).values():
            if not isinstance(value, MetricWrapperBase):
                continue
            # The declared label names of a family without children are only kept on the
            # wrapper (prometheus_client has no public accessor for them).
            own = frozenset(value._labelnames)
            for family in value.describe():
                for name in _sample_names(family.name, family.type):
                    extra = {"le"} if name.endswith("_bucket") else set()
                    labels[name] = TARGET_LABELS | own | extra
    return labels


def problems(expr: str, exported: Mapping[str, frozenset[str]]) -> list[str]:
    """Why ``expr`` would not work against ``exported`` (empty if it would): unknown
    metrics, functions, matcher labels the metric does not carry, grouping labels no
    metric of the expression carries (checked only when every metric is known)."""
    refs = promql_refs(expr)
    found = [f"unknown metric {m}" for m in sorted(refs.metrics - exported.keys())]
    found += [f"unknown function {f}" for f in sorted(refs.functions - FUNCTIONS - AGGREGATIONS)]
    for metric, label in sorted(refs.matchers, key=str):
        if metric is None:
            found.append(f"selector without a metric name matches {label}")
        elif metric in exported and label not in exported[metric]:
            found.append(f"{metric} has no label {label}")
    if refs.metrics <= exported.keys():  # an unknown metric's labels are unknown too
        available = set().union(*(exported[m] for m in refs.metrics))
        found += [f"no metric here has label {g}" for g in sorted(refs.grouping - available)]
    return found


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    return exported_metrics()


# --- the tokenizer on hand-written expressions ----------------------------------------------
def test_the_tokenizer_tells_metrics_from_functions_labels_and_strings() -> None:
    expr = (
        "sum by (le, policy_version) (rate(alignloop_request_latency_seconds_bucket"
        '{stream="true", policy_version!~"a}{b,c=d"}[$__rate_interval] offset 5m))\n'
        "  / on (job) group_left sum without(instance) (up{job='x'}) > bool 1e-3"
        " # and not_a_metric"
    )
    refs = promql_refs(expr)
    assert refs.metrics == {"alignloop_request_latency_seconds_bucket", "up"}
    assert refs.functions == {"sum", "rate"}
    assert refs.grouping == {"le", "policy_version", "job", "instance"}
    assert refs.matchers == {
        ("alignloop_request_latency_seconds_bucket", "stream"),
        ("alignloop_request_latency_seconds_bucket", "policy_version"),
        ("up", "job"),
    }
    assert promql_refs("sum(x) by (a) + max without (b) (y) - time()").metrics == {"x", "y"}


def test_the_check_finds_misspelled_metrics_labels_and_functions(exported) -> None:
    good = 'sum by (status) (rate(alignloop_http_requests_total{status=~"5.."}[5m]))'
    assert problems(good, exported) == []
    assert problems(good.replace("requests_total", "request_total"), exported) == [
        "unknown metric alignloop_http_request_total"
    ]
    assert problems(good.replace("status=~", "code=~"), exported) == [
        "alignloop_http_requests_total has no label code"
    ]
    assert problems(good.replace("by (status)", "by (policy)"), exported) == [
        "no metric here has label policy"
    ]
    assert problems(good.replace("rate(", "rates("), exported) == ["unknown function rates"]
    assert problems('{__name__="up"}', exported) == [
        "selector without a metric name matches __name__"
    ]
    # the histogram's derived series: buckets carry le, the counter has no _bucket
    assert problems("sum by (le) (alignloop_ingest_batch_seconds_bucket)", exported) == []
    assert problems("alignloop_http_requests_bucket", exported) == [
        "unknown metric alignloop_http_requests_bucket"
    ]


def test_every_module_defining_metrics_is_inspected() -> None:
    # A module that constructs a prometheus_client metric and is not in METRIC_MODULES
    # would make its metrics look unexported to the checks below.
    kinds = {"Counter", "Gauge", "Histogram", "Summary", "Info", "Enum"}
    defining = set()
    for package in ("schemas", "serving", "feedback", "trainer", "deploy"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            imported = {
                alias.asname or alias.name
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
                for alias in node.names
                if alias.name in kinds
            }
            calls = {
                node.func.id
                for node in ast.walk(tree)
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            }
            if imported & calls:
                parts = path.relative_to(REPO).with_suffix("").parts
                defining.add(".".join(parts))
    assert defining == set(METRIC_MODULES)


def test_the_routing_watcher_stamps_each_successful_read(monkeypatch) -> None:
    import time

    from serving import routing

    table = routing.RoutingTable.base_only()
    applied: list[routing.RoutingTable] = []
    watcher = routing.RoutingWatcher("postgresql://unused", applied.append)
    monkeypatch.setattr(routing, "read_table", lambda conn: table)
    before = time.time()
    watcher._reload(None, "periodic")  # type: ignore[arg-type]  # read_table is replaced
    stamped = REGISTRY.get_sample_value("alignloop_routing_table_loaded_timestamp_seconds")
    assert stamped is not None and before <= stamped <= time.time()
    assert applied == [table]

    def fail(conn: object) -> routing.RoutingTable:
        raise OSError("connection lost")

    monkeypatch.setattr(routing, "read_table", fail)
    with pytest.raises(OSError):
        watcher._reload(None, "periodic")  # type: ignore[arg-type]
    assert REGISTRY.get_sample_value("alignloop_routing_table_loaded_timestamp_seconds") == (
        stamped
    )


# --- the dashboards -------------------------------------------------------------------------
def _dashboards() -> dict[str, dict[str, Any]]:
    """The committed dashboards by file name."""
    return {
        name: json.loads((grafana.GRAFANA_DIR / name).read_text(encoding="utf-8"))
        for name in grafana.DASHBOARDS
    }


def _panel_exprs() -> Iterator[tuple[str, str]]:
    """(where, expression) for every query of every generated dashboard panel."""
    for name, build in grafana.DASHBOARDS.items():
        for panel in build()["panels"]:
            for target in panel.get("targets", []):
                yield f"{name}: {panel['title']} {target['refId']}", target["expr"]


def test_the_committed_dashboards_are_what_the_generator_writes(tmp_path) -> None:
    committed = sorted(p.name for p in grafana.GRAFANA_DIR.glob("*.json"))
    assert committed == sorted(grafana.DASHBOARDS)
    for name, build in grafana.DASHBOARDS.items():
        text = (grafana.GRAFANA_DIR / name).read_text(encoding="utf-8")
        assert text == grafana.render(build()), (
            f"deploy/grafana/{name} is stale: run "
            "`./dev run python -m deploy.observability.grafana`"
        )
    # the command line: --check reports drift without writing, the default writes
    assert grafana.main(["--out", str(tmp_path), "--check"]) == 1
    assert list(tmp_path.iterdir()) == []
    assert grafana.main(["--out", str(tmp_path)]) == 0
    assert grafana.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "serving.json").write_text("{}\n")
    assert grafana.main(["--out", str(tmp_path), "--check"]) == 1


def test_dashboards_are_well_formed() -> None:
    uids = set()
    for name, doc in _dashboards().items():
        assert doc["schemaVersion"] == grafana.SCHEMA_VERSION, name
        assert doc["uid"] not in uids
        uids.add(doc["uid"])
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        panels = doc["panels"]
        assert [p["id"] for p in panels] == list(range(1, len(panels) + 1)), name
        taken: set[tuple[int, int]] = set()
        for panel in panels:
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, (name, panel["title"])
            cells = {
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            }
            assert not cells & taken, f"{name}: {panel['title']} overlaps another panel"
            taken |= cells
            if panel["type"] == "row":
                continue
            assert panel["type"] in {"timeseries", "stat"}
            assert panel["targets"], panel["title"]
            assert panel["fieldConfig"]["defaults"]["unit"]
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert target["expr"].strip() and "legendFormat" in target


@pytest.mark.parametrize("expr", [pytest.param(e, id=w) for w, e in _panel_exprs()])
def test_dashboard_queries_name_only_exported_metrics(expr, exported) -> None:
    assert problems(expr, exported) == []


def test_the_dashboards_show_every_alignloop_metric(exported) -> None:
    # A metric no panel shows is either dead code or a gap in the dashboards.
    shown = set()
    for _, expr in _panel_exprs():
        shown |= {re.sub(r"_(total|bucket|count|sum)$", "", m) for m in promql_refs(expr).metrics}
    families = {f.name for f in REGISTRY.collect() if f.name.startswith("alignloop_")}
    assert families - shown == set()


# --- the alert rules ------------------------------------------------------------------------
def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in markdown.splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


def test_alert_rules_are_complete_and_documented() -> None:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    groups = [g["name"] for g in doc["groups"]]
    assert len(groups) == len(set(groups))
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    anchors = _anchors(DOCS.read_text(encoding="utf-8"))
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"([0-9]+[smhd])+", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert path == "docs/observability.md" and anchor in anchors, rule["alert"]
    # the alerts the issue asks for, by what they watch
    watched = " ".join(r["expr"] for r in rules)
    for metric in (
        "alignloop_http_requests_total",
        "alignloop_events_spool_records",
        "alignloop_ingest_consumer_lag",
        "alignloop_ingest_dead_letters_total",
        "alignloop_canary_srm_p_value",
        "alignloop_training_rounds_total",
        "alignloop_routing_table_loaded_timestamp_seconds",
        "alignloop_events_kafka_up",
        'up{job="alignloop-serving"}',
    ):
        assert metric in watched


@pytest.mark.parametrize("rule", _rules(), ids=lambda r: r["alert"])
def test_alert_expressions_name_only_exported_metrics(rule, exported) -> None:
    assert problems(rule["expr"], exported) == []


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    assert PROMTOOL is not None
    run = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path) -> None:
    # promtool has no offline query parser; recording rules are parsed the same way.
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$__range", "6h"),
        }
        for i, (_, expr) in enumerate(_panel_exprs())
    ]
    path = tmp_path / "dashboards.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    assert PROMTOOL is not None
    run = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


# Synthetic series, one minute apart ("_" is a missing scrape), and what must be firing.
SERVING = 'job="alignloop-serving", instance="s1:8000"'
PROMTOOL_CASES: list[dict[str, Any]] = [
    {  # 10 % errors at one request a second: pages after 5 minutes
        "interval": "1m",
        "input_series": [
            {
                "series": f'alignloop_http_requests_total{{{SERVING}, status="200"}}',
                "values": "0+54x20",
            },
            {
                "series": f'alignloop_http_requests_total{{{SERVING}, status="500"}}',
                "values": "0+6x20",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "AlignloopHigh5xxRate", "exp_alerts": []},
            {
                "eval_time": "12m",
                "alertname": "AlignloopHigh5xxRate",
                "exp_alerts": [
                    {"exp_labels": {"severity": "critical", "job": "alignloop-serving"}}
                ],
            },
        ],
    },
    {  # one error a minute on an idle service is not a 5xx rate
        "interval": "1m",
        "input_series": [
            {
                "series": f'alignloop_http_requests_total{{{SERVING}, status="500"}}',
                "values": "0+1x30",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "25m", "alertname": "AlignloopHigh5xxRate", "exp_alerts": []}
        ],
    },
    {  # replica s1 stopped reading at 3m; s2 has no database and never reads
        "interval": "1m",
        "input_series": [
            {
                "series": f"alignloop_routing_table_loaded_timestamp_seconds{{{SERVING}}}",
                "values": "0 60 120 180x20",
            },
            {
                "series": "alignloop_routing_table_loaded_timestamp_seconds"
                '{job="alignloop-serving", instance="s2:8000"}',
                "values": "0x23",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "AlignloopRoutingTableStale", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "AlignloopRoutingTableStale",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "alignloop-serving",
                            "instance": "s1:8000",
                        }
                    }
                ],
            },
        ],
    },
    {  # the gauges' start values (p 0, stage 0) and an ended canary do not alert; an SRM
        # hold on a live canary does
        "interval": "1m",
        "input_series": [
            {
                "series": 'alignloop_canary_srm_p_value{job="alignloop-controller", instance="c"}',
                "values": "0 0 0 0.5 0.5 0.0002x5 0.0002x20",
            },
            {
                "series": 'alignloop_canary_stage{job="alignloop-controller", instance="c"}',
                "values": "0 0 0 0 0 0x5 -1x20",
            },
            {
                "series": "alignloop_canary_decisions_total"
                '{job="alignloop-controller", instance="c", action="hold"}',
                "values": "_ _ _ _ _ 1+1x5 10x20",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "2m",
                "alertname": "AlignloopCanaryHeldBySampleRatio",
                "exp_alerts": [],
            },
            {
                "eval_time": "9m",
                "alertname": "AlignloopCanaryHeldBySampleRatio",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "alignloop-controller",
                            "instance": "c",
                        }
                    }
                ],
            },
            {
                "eval_time": "20m",
                "alertname": "AlignloopCanaryHeldBySampleRatio",
                "exp_alerts": [],
            },
        ],
    },
    {  # the first failure of a long-running loop creates its series at 1
        "interval": "1m",
        "input_series": [
            {
                "series": "alignloop_training_rounds_total"
                '{job="alignloop-trainer", instance="t", outcome="failed"}',
                "values": "_ _ _ _ _ 1x100",
            },
            {
                "series": "alignloop_training_rounds_total"
                '{job="alignloop-trainer", instance="t", outcome="registered"}',
                "values": "1x105",
            },
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "AlignloopTrainingRoundFailed", "exp_alerts": []},
            {
                "eval_time": "6m",
                "alertname": "AlignloopTrainingRoundFailed",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "alignloop-trainer",
                            "outcome": "failed",
                        }
                    }
                ],
            },
            {"eval_time": "100m", "alertname": "AlignloopTrainingRoundFailed", "exp_alerts": []},
        ],
    },
    {  # the first dead letter alerts too
        "interval": "1m",
        "input_series": [
            {
                "series": "alignloop_ingest_dead_letters_total"
                '{job="alignloop-ingestor", instance="i", kind="invalid"}',
                "values": "_ _ 1x40",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "3m",
                "alertname": "AlignloopIngestDeadLetters",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "alignloop-ingestor",
                            "kind": "invalid",
                        }
                    }
                ],
            },
            {"eval_time": "40m", "alertname": "AlignloopIngestDeadLetters", "exp_alerts": []},
        ],
    },
    {  # a spool that fills for 15 minutes; a drained one does not alert
        "interval": "1m",
        "input_series": [
            {"series": f"alignloop_events_spool_records{{{SERVING}}}", "values": "0+10x40"},
            {
                "series": 'alignloop_events_spool_records{job="alignloop-serving", instance="s2"}',
                "values": "500-10x50",
            },
            {"series": f"alignloop_events_kafka_up{{{SERVING}}}", "values": "0x40"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "30m",
                "alertname": "AlignloopEventSpoolGrowing",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "alignloop-serving",
                            "instance": "s1:8000",
                        }
                    }
                ],
            },
            {
                "eval_time": "30m",
                "alertname": "AlignloopEventPublisherKafkaDown",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "alignloop-serving",
                            "instance": "s1:8000",
                        }
                    }
                ],
            },
        ],
    },
    {  # a quarantined event warns at once, per topic and reason; quiet 15 minutes later
        "interval": "1m",
        "input_series": [
            {
                "series": "alignloop_events_quarantined_total"
                f'{{{SERVING}, topic="alignloop.feedback", reason="too_large"}}',
                "values": "0 0 1x30",
            },
            {
                "series": "alignloop_events_quarantined_total"
                f'{{{SERVING}, topic="alignloop.interactions", reason="too_large"}}',
                "values": "0x30",
            },
        ],
        "alert_rule_test": [
            {
                "eval_time": "5m",
                "alertname": "AlignloopEventsQuarantined",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "alignloop-serving",
                            "instance": "s1:8000",
                            "topic": "alignloop.feedback",
                            "reason": "too_large",
                        }
                    }
                ],
            },
            {"eval_time": "25m", "alertname": "AlignloopEventsQuarantined", "exp_alerts": []},
        ],
    },
    {  # serving down pages; a component down warns
        "interval": "1m",
        "input_series": [
            {"series": f"up{{{SERVING}}}", "values": "1 1 0x10"},
            {"series": 'up{job="alignloop-ingestor", instance="i"}', "values": "0x10"},
            {"series": 'up{job="alignloop-controller", instance="c"}', "values": "1x10"},
        ],
        "alert_rule_test": [
            {
                "eval_time": "8m",
                "alertname": "AlignloopServingDown",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "job": "alignloop-serving",
                            "instance": "s1:8000",
                        }
                    }
                ],
            },
            {
                "eval_time": "8m",
                "alertname": "AlignloopComponentDown",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "job": "alignloop-ingestor",
                            "instance": "i",
                        }
                    }
                ],
            },
        ],
    },
]


@needs_promtool
def test_the_alerts_fire_on_synthetic_series(tmp_path) -> None:
    # Annotations are left out of the copy under test: promtool compares them verbatim,
    # and their wording is not what these cases check.
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(doc))
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": PROMTOOL_CASES,
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    assert PROMTOOL is not None
    run = subprocess.run(
        [PROMTOOL, "test", "rules", "tests.yml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr
