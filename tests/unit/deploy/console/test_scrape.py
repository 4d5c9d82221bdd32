"""The live numbers read from a Prometheus exposition: summed over label sets, others
ignored."""

from __future__ import annotations

from deploy.console.scrape import summarize

EXPOSITION = """\
# HELP alignloop_events_spool_records Events waiting in the disk spool.
# TYPE alignloop_events_spool_records gauge
alignloop_events_spool_records 12.0
# HELP alignloop_ingest_dead_letters_total Messages sent to the dead-letter topic.
# TYPE alignloop_ingest_dead_letters_total counter
alignloop_ingest_dead_letters_total{kind="invalid"} 2.0
alignloop_ingest_dead_letters_total{kind="oversized"} 1.0
# HELP alignloop_http_requests_total HTTP requests answered.
# TYPE alignloop_http_requests_total counter
alignloop_http_requests_total{route="/v1/chat/completions",status="200"} 5.0
"""


def test_summarize_sums_label_sets_of_the_shown_samples_only() -> None:
    assert summarize(EXPOSITION) == {
        "alignloop_events_spool_records": 12.0,
        "alignloop_ingest_dead_letters_total": 3.0,
    }
