"""The Grafana dashboards, built as plain data: one function per dashboard.

The JSON files in ``deploy/grafana/`` are generated from this module, never edited by
hand: ``python -m deploy.observability.grafana`` rewrites them (``--check`` only reports
whether they are current), and ``tests/unit/deploy/test_observability.py`` fails when they
drift or when a panel's PromQL names a metric or label the code does not export.

Every panel queries the Prometheus data source chosen in the dashboard's ``datasource``
template variable, so a dashboard imports into any Grafana without editing. Rates use
``$__rate_interval`` (Grafana picks a window of at least four scrape intervals); totals
over the visible range use ``$__range``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

GRAFANA_DIR = Path(__file__).resolve().parents[1] / "grafana"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

Panel = dict[str, Any]
Target = tuple[str, str]
"""(PromQL expression, legend format)."""


# --- panels ---------------------------------------------------------------------------------
def _targets(targets: Sequence[Target]) -> list[dict[str, Any]]:
    """Grafana query objects, refIds A, B, C... in the given order."""
    return [
        {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": expr,
            "legendFormat": legend,
            "range": True,
            "refId": chr(ord("A") + i),
        }
        for i, (expr, legend) in enumerate(targets)
    ]


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> dict[str, Any]:
    """Absolute thresholds; the first step's value is None (from minus infinity)."""
    return {
        "mode": "absolute",
        "steps": [{"color": color, "value": value} for value, color in steps],
    }


def timeseries(
    title: str,
    targets: Sequence[Target],
    *,
    unit: str = "short",
    description: str = "",
    min_value: float | None = 0,
    max_value: float | None = None,
    log_scale: bool = False,
    thresholds: Sequence[tuple[float | None, str]] | None = None,
    stack: bool = False,
) -> Panel:
    """A time-series panel (without ``id``/``gridPos``, which :class:`_Grid` assigns).
    ``thresholds``, when given, are drawn as dashed lines; ``log_scale`` uses a base-10
    axis (for p-values)."""
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "fillOpacity": 10,
        "lineWidth": 1,
        "pointSize": 4,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"group": "A", "mode": "normal" if stack else "none"},
        "thresholdsStyle": {"mode": "dashed" if thresholds else "off"},
    }
    if log_scale:
        custom["scaleDistribution"] = {"log": 10, "type": "log"}
    defaults: dict[str, Any] = {
        "color": {"mode": "palette-classic"},
        "custom": custom,
        "thresholds": _thresholds(thresholds or [(None, "green")]),
        "unit": unit,
    }
    if min_value is not None and not log_scale:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "datasource": DATASOURCE,
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {
                "calcs": ["lastNotNull", "max"],
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": _targets(targets),
        "title": title,
        "type": "timeseries",
    }


def stat(
    title: str,
    targets: Sequence[Target],
    *,
    unit: str = "short",
    description: str = "",
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),),
    mappings: Sequence[dict[str, Any]] = (),
    decimals: int | None = None,
) -> Panel:
    """A single-value panel showing each series' last value, coloured by ``thresholds``."""
    defaults: dict[str, Any] = {
        "color": {"mode": "thresholds"},
        "mappings": list(mappings),
        "thresholds": _thresholds(thresholds),
        "unit": unit,
    }
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "datasource": DATASOURCE,
        "description": description,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "textMode": "auto",
        },
        "targets": _targets(targets),
        "title": title,
        "type": "stat",
    }


def value_text(value: int, text: str, color: str) -> dict[str, Any]:
    """A stat value mapping: show ``text`` in ``color`` for exactly ``value``."""
    return {
        "options": {str(value): {"color": color, "index": 0, "text": text}},
        "type": "value",
    }


class _Grid:
    """Lays panels out left to right on Grafana's 24-column grid, wrapping to a new line,
    and numbers them; :meth:`row` starts a titled section on a line of its own."""

    WIDTH = 24

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self._x = 0
        self._y = 0
        self._line_height = 0

    def _newline(self) -> None:
        self._y += self._line_height
        self._x = 0
        self._line_height = 0

    def row(self, title: str) -> None:
        """A (never collapsed) row header across the full width."""
        if self._x:
            self._newline()
        self.panels.append(
            {
                "collapsed": False,
                "gridPos": {"h": 1, "w": self.WIDTH, "x": 0, "y": self._y},
                "id": len(self.panels) + 1,
                "panels": [],
                "title": title,
                "type": "row",
            }
        )
        self._y += 1

    def add(self, panel: Panel, w: int = 8, h: int = 8) -> None:
        """Place ``panel`` (w columns by h rows) after the previous one, or on a new line
        when it does not fit."""
        if self._x + w > self.WIDTH:
            self._newline()
        grid_pos = {"h": h, "w": w, "x": self._x, "y": self._y}
        self.panels.append({**panel, "gridPos": grid_pos, "id": len(self.panels) + 1})
        self._x += w
        self._line_height = max(self._line_height, h)


def dashboard(uid: str, title: str, description: str, grid: _Grid) -> dict[str, Any]:
    """The dashboard document: the panels of ``grid``, the ``datasource`` variable, the
    built-in annotations, a 6-hour window refreshed every 30 s."""
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "liveNow": False,
        "panels": grid.panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["alignloop"],
        "templating": {
            "list": [
                {
                    "current": {},
                    "hide": 0,
                    "includeAll": False,
                    "label": "Data source",
                    "multi": False,
                    "name": "datasource",
                    "options": [],
                    "query": "prometheus",
                    "refresh": 1,
                    "regex": "",
                    "skipUrlSync": False,
                    "type": "datasource",
                }
            ]
        },
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def _quantiles(metric: str, qs: Sequence[float], by: str = "") -> list[Target]:
    """histogram_quantile targets of ``metric``'s buckets, one per quantile, optionally
    split by the labels in ``by`` (comma-separated)."""
    labels = f"le, {by}" if by else "le"
    suffix = " " + " ".join(f"{{{{{label.strip()}}}}}" for label in by.split(",")) if by else ""
    return [
        (
            f"histogram_quantile({q}, sum by ({labels}) (rate({metric}_bucket[{RATE}])))",
            f"p{round(q * 100)}{suffix}",
        )
        for q in qs
    ]


# --- the dashboards -------------------------------------------------------------------------
# Long only in lines: a table of panels, one call each, in the order shown.
def serving_dashboard() -> dict[str, Any]:
    """Serving replicas (``serving/metrics.py``, ``serving/routing.py``,
    ``serving/policies.py``) and their event publisher (``serving/publisher.py``)."""
    g = _Grid()
    requests = "alignloop_http_requests_total"
    g.row("Requests")
    g.add(
        stat(
            "5xx ratio",
            [
                (
                    f'sum(rate({requests}{{status=~"5.."}}[{RATE}])) '
                    f"/ sum(rate({requests}[{RATE}]))",
                    "5xx",
                )
            ],
            unit="percentunit",
            decimals=2,
            thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
            description="Share of HTTP answers with a 5xx status (alert at 5 %).",
        ),
        w=4,
    )
    g.add(
        stat(
            "In flight",
            [("sum(alignloop_requests_in_flight)", "in flight")],
            description="Chat and legacy completions being generated now, all replicas.",
        ),
        w=4,
    )
    g.add(
        timeseries(
            "Requests by status",
            [(f"sum by (status) (rate({requests}[{RATE}]))", "{{status}}")],
            unit="reqps",
            stack=True,
            description="HTTP answers per second, by status code, all routes.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Requests by policy version",
            [(f"sum by (policy_version) (rate({requests}[{RATE}]))", "{{policy_version}}")],
            unit="reqps",
            stack=True,
            description="Answers per second by the policy version that produced them "
            "('-': none, e.g. feedback and errors before routing).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "5xx ratio by route",
            [
                (
                    f'sum by (route) (rate({requests}{{status=~"5.."}}[{RATE}])) '
                    f"/ sum by (route) (rate({requests}[{RATE}]))",
                    "{{route}}",
                )
            ],
            unit="percentunit",
            thresholds=[(None, "green"), (0.05, "red")],
            description="Share of each route's answers with a 5xx status.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Latency (request to last byte)",
            _quantiles("alignloop_request_latency_seconds", (0.5, 0.95, 0.99)),
            unit="s",
            description="Chat/legacy completion latency quantiles, all versions.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Latency p95 by policy version",
            _quantiles("alignloop_request_latency_seconds", (0.95,), by="policy_version"),
            unit="s",
            description="The canary's latency guardrail compares these two arms.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Time to first token",
            _quantiles("alignloop_time_to_first_token_seconds", (0.5, 0.99), by="stream"),
            unit="s",
            description="From arrival to the first generated token, streamed or not.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Tokens per second",
            [
                (
                    f"sum by (policy_version) (rate(alignloop_completion_tokens_total[{RATE}]))",
                    "generated {{policy_version}}",
                ),
                (f"sum(rate(alignloop_prompt_tokens_total[{RATE}]))", "prompt (all)"),
            ],
            description="Generated tokens by policy version, and prompt tokens processed.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "In flight by replica",
            [("sum by (instance) (alignloop_requests_in_flight)", "{{instance}}")],
            description="Completions being generated now, per replica.",
        ),
        w=8,
    )

    g.row("Routing and adapters")
    g.add(
        timeseries(
            "Routed requests by arm",
            [(f"sum by (arm) (rate(alignloop_routed_requests_total[{RATE}]))", "{{arm}}")],
            unit="reqps",
            stack=True,
            description="How requests were routed: stable, canary, pinned (named a "
            "version) or fallback (canary adapter unavailable, served by stable).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Routing table generation",
            [("max by (instance) (alignloop_routing_generation)", "{{instance}}")],
            min_value=None,
            description="The generation each replica applies; replicas should agree "
            "within seconds of a change.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Routing table age",
            [
                (
                    "time() - (alignloop_routing_table_loaded_timestamp_seconds > 0)",
                    "{{instance}}",
                )
            ],
            unit="s",
            thresholds=[(None, "green"), (60, "red")],
            description="Seconds since each replica last read the routing table from "
            "Postgres (re-read on every change and every routing_refresh_s, 5 s); absent "
            "for a replica that never read it (no database configured, or not reached "
            "yet). Alert at 60 s.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Routing table reads by trigger",
            [
                (
                    f"sum by (trigger) (rate(alignloop_routing_reloads_total[{RATE}]))",
                    "{{trigger}}",
                )
            ],
            unit="ops",
            description="start (connect), notify (a change) or periodic (safety net).",
        ),
        w=12,
    )
    g.add(
        timeseries(
            "Adapter loads",
            [
                (
                    f"sum by (version, outcome) (increase(alignloop_adapter_loads_total[{RATE}]))",
                    "{{version}} {{outcome}}",
                )
            ],
            description="LoRA adapters loaded into the engine; a failed canary load is a "
            "rollback guardrail.",
        ),
        w=12,
    )

    g.row("Event publisher")
    g.add(
        stat(
            "Kafka reachable",
            [("min(alignloop_events_kafka_up)", "kafka")],
            thresholds=[(None, "red"), (1, "green")],
            mappings=[value_text(0, "DOWN", "red"), value_text(1, "UP", "green")],
            description="0 on any replica whose producer cannot reach Kafka (events go "
            "to the disk spool).",
        ),
        w=4,
    )
    g.add(
        stat(
            "Spooled events",
            [("sum(alignloop_events_spool_records)", "records")],
            thresholds=[(None, "green"), (1, "orange")],
            description="Events waiting in the disk spools for Kafka, all replicas.",
        ),
        w=4,
    )
    g.add(
        timeseries(
            "Memory queue depth",
            [("sum by (instance) (alignloop_events_queue_depth)", "{{instance}}")],
            description="Events handed to publish() and not yet sent or spooled.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Spool size",
            [("sum by (instance) (alignloop_events_spool_bytes)", "{{instance}}")],
            unit="bytes",
            description="Encoded bytes in each replica's spool (bounded by "
            "ALIGNLOOP_SPOOL_MAX_BYTES; interactions are dropped once they fill all but "
            "ALIGNLOOP_SPOOL_FEEDBACK_RESERVE of it, feedback answers 503 only when it is full).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Events handed over by outcome",
            [
                (
                    f"sum by (topic, outcome) (rate(alignloop_events_published_total[{RATE}]))",
                    "{{topic}} {{outcome}}",
                ),
                (
                    f"sum by (topic) (rate(alignloop_events_replayed_total[{RATE}]))",
                    "{{topic}} replayed",
                ),
            ],
            unit="ops",
            description="kafka: acked; spool: fsync'd for replay; dropped: spool full or "
            "publisher closed; quarantined: refused for good (see Quarantined events); "
            "replayed: spooled events acked by Kafka later.",
        ),
        w=12,
    )
    g.add(
        timeseries(
            "Hand-over latency",
            _quantiles("alignloop_events_publish_ack_seconds", (0.5, 0.99), by="outcome"),
            unit="s",
            description="From publish() to a Kafka ack or a spool fsync (POST /v1/feedback "
            "waits this long).",
        ),
        w=12,
    )
    g.add(
        timeseries(
            "Quarantined events",
            [
                (
                    f"sum by (topic, reason) (rate(alignloop_events_quarantined_total[{RATE}]))",
                    "{{topic}} {{reason}}",
                ),
                (
                    f"sum by (topic) (rate(alignloop_events_quarantine_unwritten_total[{RATE}]))",
                    "{{topic}} line not written",
                ),
            ],
            unit="ops",
            description="Events Kafka will never take (too_large: over "
            "ALIGNLOOP_MAX_EVENT_BYTES; serialization; or the broker's refusal), written to "
            "quarantine.jsonl in the replica's spool directory instead of being retried. "
            "'line not written': the quarantine file was full or failing, the event is lost.",
        ),
        w=12,
    )
    g.add(
        timeseries(
            "Quarantine file size",
            [("sum by (instance) (alignloop_events_quarantine_bytes)", "{{instance}}")],
            unit="bytes",
            description="Size of each replica's quarantine.jsonl (bounded like the spool); "
            "nothing empties it but an operator.",
        ),
        w=12,
    )
    g.row("Abuse limits")
    g.add(
        timeseries(
            "Refused by the limits",
            [
                (
                    f"sum by (reason) (rate(alignloop_rate_limited_total[{RATE}]))",
                    "429 {{reason}}",
                ),
                (f"sum (rate(alignloop_receive_timeouts_total[{RATE}]))", "408 receive deadline"),
            ],
            unit="ops",
            description="429s per reason (a key's request or token budget, the queue of "
            "generations full) and 408s (a client that did not send its request in "
            "ALIGNLOOP_RECEIVE_DEADLINE_S). Steady 429s for one key: raise its limits or talk "
            "to its owner; queue_full: add replicas.",
        ),
        w=12,
    )
    g.add(
        timeseries(
            "Generations queued and abandoned",
            [
                ("sum by (instance) (alignloop_queued_generations)", "queued {{instance}}"),
                (
                    f"sum by (stream) (rate(alignloop_generations_aborted_total[{RATE}]))",
                    "aborted (client left) stream={{stream}}",
                ),
            ],
            description="Generations admitted and not yet answered per replica (bounded by "
            "ALIGNLOOP_MAX_QUEUED_GENERATIONS), and generations aborted because their client "
            "disconnected (no interaction logged, not a server fault).",
        ),
        w=12,
    )
    return dashboard(
        "alignloop-serving",
        "alignloop — serving",
        "Chat API replicas: traffic, errors, latency, routing and the event publisher.",
        g,
    )


# Long only in lines: a table of panels, one call each, in the order shown.
def feedback_canary_dashboard() -> dict[str, Any]:
    """The ingestor (``feedback/ingest/consumer.py``) and the canary controller
    (``deploy/canary/controller.py``)."""
    g = _Grid()
    g.row("Ingest")
    g.add(
        timeseries(
            "Events consumed",
            [
                (
                    f"sum by (topic, event_type) (rate(alignloop_ingest_events_total[{RATE}]))",
                    "{{topic}} {{event_type}}",
                )
            ],
            unit="ops",
            description="Valid events consumed per second (redeliveries included).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Rows inserted",
            [
                (
                    f"sum by (table) (rate(alignloop_ingest_rows_inserted_total[{RATE}]))",
                    "{{table}}",
                )
            ],
            unit="ops",
            description="Events new to Postgres, per table (duplicates are not counted).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Consumer lag",
            [("sum by (topic) (alignloop_ingest_consumer_lag)", "{{topic}}")],
            thresholds=[(None, "green"), (10000, "red")],
            description="Messages after the last committed offset, summed over the "
            "partitions this group owns. Alert at 10,000.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Dead letters",
            [
                (
                    f"sum by (kind) (increase(alignloop_ingest_dead_letters_total[{RATE}]))",
                    "{{kind}}",
                )
            ],
            description="invalid: failed parsing or validation; db_rejected: refused by "
            "Postgres. Any is worth a look (alignloop.dead-letter topic).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "DB write retries",
            [(f"sum(increase(alignloop_ingest_db_retries_total[{RATE}]))", "retries")],
            description="Batch writes retried after a Postgres error (backoff 0.25-5 s).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Batch duration",
            [
                *_quantiles("alignloop_ingest_batch_seconds", (0.5, 0.99)),
                (
                    f"sum(rate(alignloop_ingest_batch_seconds_sum[{RATE}])) "
                    f"/ sum(rate(alignloop_ingest_batch_seconds_count[{RATE}]))",
                    "mean",
                ),
            ],
            unit="s",
            description="From poll to offset commit, per batch.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Erasure and retention",
            [
                (f"sum(increase(alignloop_ingest_erased_events_total[{RATE}]))", "erased dropped"),
                (
                    f"sum by (table) (increase(alignloop_ingest_purged_rows_total[{RATE}]))",
                    "purged {{table}}",
                ),
            ],
            description="Events dropped because their user (or the answer they name) was "
            "erased, and rows the retention purge deleted (ALIGNLOOP_RETENTION_DAYS).",
        ),
        w=8,
    )

    g.row("Canary")
    g.add(
        stat(
            "Ramp stage",
            [("max(alignloop_canary_stage)", "stage")],
            mappings=[value_text(-1, "no canary", "text")],
            description="Index into the controller's ramp stages; -1 when no canary runs.",
        ),
        w=4,
    )
    g.add(
        stat(
            "SRM p-value",
            [("min(alignloop_canary_srm_p_value)", "p")],
            unit="none",
            thresholds=[(None, "red"), (0.001, "green")],
            description="Anytime-valid sample-ratio-mismatch p-value; below the configured "
            "srm_p_value (0.001 by default) the controller holds the canary for a human.",
        ),
        w=4,
    )
    g.add(
        timeseries(
            "Canary − stable thumbs-up rate",
            [("max by (which) (alignloop_canary_difference)", "{{which}}")],
            unit="percentunit",
            min_value=None,
            description="Estimate and always-valid bounds of canary minus stable; "
            "threshold is 0 (superiority) or -margin (non-inferiority).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Votes by arm",
            [("max by (arm) (alignloop_canary_votes)", "{{arm}}")],
            description="Ratings counted in the current canary test.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "SRM p-value",
            [("min(alignloop_canary_srm_p_value)", "p-value")],
            unit="none",
            log_scale=True,
            thresholds=[(None, "red"), (0.001, "green")],
            description="Log scale; the dashed line is the default hold threshold.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Decisions by action",
            [
                (
                    f"sum by (action) (increase(alignloop_canary_decisions_total[{RATE}]))",
                    "{{action}}",
                ),
                (
                    f"sum(increase(alignloop_canary_conflicts_total[{RATE}]))",
                    "not applied (conflict)",
                ),
            ],
            stack=True,
            description="One decision per controller tick: continue, advance_stage, "
            "promote, rollback or hold; conflicts: the registry changed meanwhile.",
        ),
        w=16,
    )
    return dashboard(
        "alignloop-feedback-canary",
        "alignloop — feedback & canary",
        "The feedback ingestor (Kafka to Postgres) and the canary controller.",
        g,
    )


# Long only in lines: a table of panels, one call each, in the order shown.
def training_dashboard() -> dict[str, Any]:
    """The PPO rounds (``trainer/rounds/training_round.py``) and the reward model rounds
    (``trainer/reward/trainer.py``) of the training loop."""
    g = _Grid()
    metric = "alignloop_ppo_iteration_metric"
    g.row("Rounds")
    g.add(
        stat(
            "Round running",
            [("max(alignloop_training_round_running)", "running")],
            mappings=[value_text(0, "idle", "text"), value_text(1, "running", "green")],
        ),
        w=4,
    )
    g.add(
        stat(
            "PPO rounds in range",
            [
                (
                    "sum by (outcome) (increase(alignloop_training_rounds_total[$__range]))",
                    "{{outcome}}",
                )
            ],
            decimals=0,
            description="registered, rejected (failed the gate), stopped, failed, aborted.",
        ),
        w=10,
    )
    g.add(
        stat(
            "Reward model rounds in range",
            [
                (
                    "sum by (outcome) (increase(alignloop_reward_rounds_total[$__range]))",
                    "{{outcome}}",
                )
            ],
            decimals=0,
            description="registered, rejected, insufficient_data, stopped.",
        ),
        w=10,
    )

    g.row("PPO")
    g.add(
        timeseries(
            "Iterations per minute",
            [(f"sum(rate(alignloop_ppo_iterations_total[{RATE}])) * 60", "iterations")],
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Episodes per second",
            [(f"sum(rate(alignloop_ppo_episodes_total[{RATE}]))", "episodes")],
            description="Rollout episodes (prompt and response) trained on.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Rollout tokens per second",
            [
                (f"sum(rate(alignloop_ppo_rollout_tokens_total[{RATE}]))", "counter rate"),
                (f'{metric}{{metric="rollout_tokens_per_s"}}', "last iteration"),
            ],
            description="Tokens sampled in rollouts: the counter's rate, and the last "
            "iteration's own measurement (rollout phase only).",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Reward",
            [(f'{metric}{{metric=~"reward_.*"}}', "{{metric}}")],
            min_value=None,
            description="Mean reward model score of the last iteration: raw, normalised "
            "and per component.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "KL",
            [(f'{metric}{{metric=~"kl_ref|kl_coef|next_kl_coef|approx_kl"}}', "{{metric}}")],
            description="KL to the reference (per sequence; the round aborts above "
            "--abort-kl), the KL coefficient β and the approximate KL of the update.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Clip fractions and entropy",
            [
                (
                    f'{metric}{{metric=~"clip_fraction|value_clip_fraction|entropy"}}',
                    "{{metric}}",
                )
            ],
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Losses and gradient norm",
            [
                (
                    f'{metric}{{metric=~"policy_loss|value_loss|ptx_loss|grad_norm"}}',
                    "{{metric}}",
                )
            ],
            min_value=None,
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Explained variance and log-prob gap",
            [
                (
                    f'{metric}{{metric=~"explained_variance|sampler_logprob_gap"}}',
                    "{{metric}}",
                )
            ],
            min_value=None,
            description="Critic quality, and the gap between the sampler's and the "
            "trainer's log-probabilities of the sampled tokens.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Seconds per phase",
            [(f'{metric}{{metric=~"sync_s|rollout_s|score_s|update_s|seconds"}}', "{{metric}}")],
            unit="s",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Response length",
            [(f'{metric}{{metric="response_length"}}', "tokens")],
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Offline evaluation of the latest candidate",
            [("alignloop_ppo_eval_metric", "{{metric}}")],
            min_value=None,
            description="win_rate, reward_gain, kl_to_reference, distinct_2_ratio: the "
            "promotion gate's inputs.",
        ),
        w=16,
    )

    g.row("Reward model")
    g.add(
        timeseries(
            "Training loss",
            [("alignloop_reward_train_loss", "loss")],
            description="Loss of the latest reward model training step.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Round progress",
            [("alignloop_reward_train_progress", "progress")],
            unit="percentunit",
            max_value=1,
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Held-out metrics of the latest candidate",
            [("alignloop_reward_heldout_metric", "{{metric}}")],
            unit="percentunit",
            description="pairwise_accuracy and auc on held-out preferences.",
        ),
        w=8,
    )
    g.add(
        timeseries(
            "Optimizer steps and pairs per second",
            [
                (f"sum(rate(alignloop_reward_train_steps_total[{RATE}]))", "steps"),
                (f"sum(rate(alignloop_reward_train_pairs_total[{RATE}]))", "pairs"),
            ],
        ),
        w=24,
    )
    return dashboard(
        "alignloop-training",
        "alignloop — training",
        "The training loop: PPO rounds, per-iteration metrics, reward model rounds.",
        g,
    )


DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    "serving.json": serving_dashboard,
    "feedback-canary.json": feedback_canary_dashboard,
    "training.json": training_dashboard,
}
"""File name in ``deploy/grafana/`` -> the function that builds it."""


def render(doc: dict[str, Any]) -> str:
    """The committed form of a dashboard: sorted keys, indent 2, a trailing newline."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write every dashboard to ``--out`` (``deploy/grafana``); with ``--check`` write
    nothing and return 1 when a file there differs from what this module generates."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GRAFANA_DIR)
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = render(build())
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'} {path}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
