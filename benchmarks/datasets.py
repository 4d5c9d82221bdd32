"""Building a round's training data from a million ratings: time and peak memory.

Fills a fresh database on the local Postgres (COPY into the ingestor's tables:
``interactions``, ``interaction_choices``, ``feedback_events``) with ``--ratings`` thumbs
(default 1,000,000) on answers to ``--prompts`` prompts, where 10 prompts get half the
traffic (about 40,000 answers each: all-ups-against-all-downs would pair each of them into
hundreds of millions). 80 % of the ratings are each answer's first; the rest are second
users' ratings and re-ratings. Then, in a fresh Python process (so its peak RSS is the
build's own, not the filler's), builds what a round reads, the way the trainer does:

* ``reward_cold``: :func:`trainer.reward.data.load_data` from scratch: preference pairs
  (capped per prompt) and thumbs labels streamed, split by prompt, sampled to the caps;
* ``reward_warm``: the same with a parent watermark at 90 % of the rows (new examples
  plus replay; the parent's examples are read too);
* ``ppo_prompts``: :func:`feedback.datasets.rollout_prompts` (the round's prompt pool);
* ``ppo_ptx``: the PPO-ptx up-rated answers (:func:`trainer.rounds.training_round.ptx_labels`).

    python -m benchmarks.datasets [--quick] [--ratings 1000000] [--prompts 100000]
        [--database-url URL  (an already filled database: no fill, no drop)] [--keep]

Prints one JSON object on stdout: seconds and rows per phase, ``round_s`` (reward_cold +
ppo_prompts + ppo_ptx: a first round's data), ``round_warm_s`` (the same with reward_warm:
a later round's), ``peak_rss_mb`` of the building process
(``ru_maxrss``; the sampled peak and the RSS after imports beside it), ``uncapped_pairs``
(what pairing every up with every down would have made), the machine's 1-minute load
average before and after the build (other processes share the cores), the date and the
command.
Postgres's own memory is not included (another process, bounded by its settings).
Uses ALIGNLOOP_TEST_PG_ADMIN_URL (default postgres@127.0.0.1:5432) to create the database.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from feedback import datasets
from feedback.db import connect, migrate
from schemas.events import LoggedMessage, prompt_hash
from tests.fixtures.postgres import create_database, drop_database

ROOT = Path(__file__).resolve().parents[1]

HOT_PROMPTS = 10
VOCABULARY = (
    "the a model answer user question short long clear wrong right maybe because however "
    "first then finally example code python list table reason step result value error "
    "simple good bad kind brief detailed honest polite we you it this that with without"
)
WORDS = VOCABULARY.split()
T0 = datetime(2025, 1, 1, tzinfo=UTC)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


# --- filling the database ------------------------------------------------------------------


def fill(url: str, n_ratings: int, n_prompts: int, seed: int) -> dict[str, int]:
    """COPY ``n_ratings`` ratings and the interactions they rate into ``url``."""
    rng = random.Random(seed)
    n_answers = round(n_ratings * 0.8)
    prompts = []  # (messages JSON, prompt text, prompt hash, up probability)
    for p in range(n_prompts):
        kind = "hot" if p < HOT_PROMPTS else "question"
        text = f"{kind} {p}: " + " ".join(rng.choices(WORDS, k=rng.randint(6, 20))) + "?"
        messages = [{"role": "user", "content": text}]
        if p % 4 == 3:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        phash = prompt_hash([LoggedMessage.model_validate(m) for m in messages])
        up_rate = 0.55 if p < HOT_PROMPTS else rng.uniform(0.2, 0.8)
        prompts.append((json.dumps(messages), text, phash, up_rate))
    sampling = json.dumps({"temperature": 1.0, "top_p": 1.0, "max_tokens": 128, "n": 1})
    answer_prompt: list[int] = []
    # Random ids, as served (chatcmpl-<uuid>): no index order matches the tables' order.
    answer_ids = [f"chatcmpl-{uuid.UUID(int=rng.getrandbits(128)).hex}" for _ in range(n_answers)]
    with connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY interactions (response_id, event_id, user_id, policy_version, model, "
            "messages, prompt_text, prompt_hash, prompt_tokens, completion_tokens, latency_ms, "
            "ttft_ms, stream, sampling, occurred_at) FROM STDIN"
        ) as copy:
            for a in range(n_answers):
                p = rng.randrange(HOT_PROMPTS) if rng.random() < 0.5 else rng.randrange(n_prompts)
                answer_prompt.append(p)
                messages, text, phash, _ = prompts[p]
                copy.write_row(
                    (
                        answer_ids[a],
                        uuid.uuid4(),
                        f"user{a % 50_000}",
                        "v1",
                        "alignloop",
                        messages,
                        text,
                        phash,
                        12,
                        30,
                        40.0,
                        5.0,
                        False,
                        sampling,
                        T0 + timedelta(seconds=a),
                    )
                )
        log(f"  {n_answers} interactions")
        with cur.copy(
            "COPY interaction_choices (response_id, choice_index, text, finish_reason, "
            "completion_tokens) FROM STDIN"
        ) as copy:
            for a in range(n_answers):
                words = rng.choices(WORDS, k=rng.randint(15, 45))
                copy.write_row((answer_ids[a], 0, " ".join(words), "stop", 30))
        log(f"  {n_answers} answers")
        with cur.copy(
            "COPY feedback_events (event_id, feedback_id, response_id, choice_index, user_id, "
            "user_key, rating, occurred_at) FROM STDIN"
        ) as copy:
            for r in range(n_ratings):
                if r < n_answers:  # the answer's user rates it
                    a, user, later = r, f"user{r % 50_000}", 0
                elif r % 2:  # another user rates an answer
                    a = rng.randrange(n_answers)
                    user, later = f"other{rng.randrange(50_000)}", 1
                else:  # a user re-rates an answer (the latest counts)
                    a = rng.randrange(n_answers)
                    user, later = f"user{a % 50_000}", 2
                up = rng.random() < prompts[answer_prompt[a]][3]
                feedback_id = uuid.uuid4()
                copy.write_row(
                    (
                        feedback_id,
                        feedback_id,
                        answer_ids[a],
                        0,
                        user,
                        user,
                        "up" if up else "down",
                        T0 + timedelta(seconds=a, hours=later),
                    )
                )
        log(f"  {n_ratings} ratings")
        conn.commit()
    with connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return {"answers": n_answers, "prompts": n_prompts, "hot_prompts": HOT_PROMPTS}


def uncapped_pairs(conn: psycopg.Connection) -> int:
    """Pairs that joining every up-rated with every down-rated answer would make."""
    with datasets.snapshot(conn) as wm:
        row = conn.execute(
            """
            WITH cur AS (
                SELECT DISTINCT ON (response_id, choice_index, user_key)
                       response_id, choice_index, rating
                FROM feedback_events WHERE seq <= %(feedback)s
                ORDER BY response_id, choice_index, user_key, occurred_at DESC, event_id DESC
            ), net AS (
                SELECT response_id, choice_index,
                       sum(CASE rating WHEN 'up' THEN 1 ELSE -1 END) AS net
                FROM cur GROUP BY response_id, choice_index
            ), per_prompt AS (
                SELECT i.prompt_hash, count(*) FILTER (WHERE n.net > 0) AS ups,
                       count(*) FILTER (WHERE n.net < 0) AS downs
                FROM net n JOIN interactions i USING (response_id)
                GROUP BY i.prompt_hash
            )
            SELECT coalesce(sum(ups * downs), 0) FROM per_prompt
            """,
            asdict(wm),
        ).fetchone()
    assert row is not None
    return int(row[0])


# --- building a round's data (in its own process) ----------------------------------------


class PeakRss:
    """Samples this process's RSS every 20 ms; ``peak`` is the highest seen."""

    def __init__(self) -> None:
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def build(url: str) -> dict[str, object]:
    from trainer.reward.config import RewardConfig
    from trainer.reward.data import load_data
    from trainer.rounds.config import RoundConfig
    from trainer.rounds.training_round import PTX_MAX_EXAMPLES, ptx_labels

    after_imports = rss_mb()
    config, round_config = RewardConfig(), RoundConfig()
    phases: dict[str, dict[str, float]] = {}
    with PeakRss() as peak, connect(url, autocommit=True) as conn:
        now = datasets.capture_watermark(conn)
        parent = datasets.Watermark(
            int(now.interactions * 0.9), int(now.feedback * 0.9), int(now.preferences * 0.9)
        )
        for name, parent_mark in (("reward_cold", None), ("reward_warm", parent)):
            t0 = time.perf_counter()
            data = load_data(conn, config, parent_watermark=parent_mark)
            phases[name] = {
                "seconds": round(time.perf_counter() - t0, 2),
                "pairs_read": data.pairs_read,
                "labels_read": data.labels_read,
                "train_pairs": len(data.train_pairs),
                "heldout_pairs": len(data.heldout_pairs),
                "train_labels": len(data.train_labels),
                "heldout_labels": len(data.heldout_labels),
                "new_examples": data.new_examples,
                "replayed_examples": data.replayed_examples,
                "rss_mb_after": round(rss_mb(), 1),
            }
            per_prompt: dict[str, int] = {}
            for p in data.train_pairs + data.heldout_pairs:
                if p.source == "ratings":
                    per_prompt[p.prompt_hash or ""] = per_prompt.get(p.prompt_hash or "", 0) + 1
            phases[name]["max_rating_pairs_per_prompt_kept"] = max(per_prompt.values(), default=0)
            del data
        with datasets.snapshot(conn) as wm:
            t0 = time.perf_counter()
            prompts = datasets.rollout_prompts(
                conn, wm, round_config.prompt_pool, round_config.heldout_fraction, 0
            )
            phases["ppo_prompts"] = {
                "seconds": round(time.perf_counter() - t0, 2),
                "prompts": len(prompts),
            }
            t0 = time.perf_counter()
            ptx = ptx_labels(conn, wm)
            phases["ppo_ptx"] = {
                "seconds": round(time.perf_counter() - t0, 2),
                "kept": len(ptx),
            }

    def total(*names: str) -> float:
        return round(sum(float(phases[n]["seconds"]) for n in names), 2)

    return {
        "phases": phases,
        "round_s": total("reward_cold", "ppo_prompts", "ppo_ptx"),
        "round_warm_s": total("reward_warm", "ppo_prompts", "ppo_ptx"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sampled_peak_rss_mb": round(peak.peak, 1),
        "rss_after_imports_mb": round(after_imports, 1),
        "config": {
            "max_pairs_per_prompt": config.max_pairs_per_prompt,
            "max_train_examples": config.max_train_examples,
            "max_heldout_examples": config.max_heldout_examples,
            "replay_ratio": config.replay_ratio,
            "ptx_max_examples": PTX_MAX_EXAMPLES,
            "prompt_pool": round_config.prompt_pool,
            "fetch_rows": datasets.FETCH_ROWS,
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="100,000 ratings on 10,000 prompts")
    ap.add_argument("--ratings", type=int, default=1_000_000)
    ap.add_argument("--prompts", type=int, default=100_000, help="distinct prompts, 10 hot")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--database-url", help="a database this benchmark filled before")
    ap.add_argument("--keep", action="store_true", help="do not drop the database")
    ap.add_argument("--build", metavar="URL", help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.build:
        print(json.dumps(build(args.build)))
        return 0
    if args.quick:
        args.ratings, args.prompts = 100_000, 10_000

    url = args.database_url
    filled: dict[str, object] = {}
    if url is None:
        url = create_database()
        with connect(url, autocommit=True) as conn:
            migrate(conn)
        log(f"filling {url} with {args.ratings} ratings…")
        t0 = time.perf_counter()
        filled = fill(url, args.ratings, args.prompts, args.seed)
        filled["fill_seconds"] = round(time.perf_counter() - t0, 1)
    try:
        with connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM feedback_events").fetchone()
            ratings = row[0]  # type: ignore[index]  # count(*) always returns a row
            log(f"{ratings} ratings; building a round's data in a fresh process…")
            load_before = os.getloadavg()[0]
            child = subprocess.run(
                [sys.executable, "-m", "benchmarks.datasets", "--build", url],
                check=True,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            result = json.loads(child.stdout)
            result["load_average_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            log("counting what all-against-all pairing would have made…")
            result["uncapped_pairs"] = uncapped_pairs(conn)
    finally:
        if args.database_url is None and not args.keep:
            drop_database(url)
        elif args.keep:
            log(f"kept {url}")
    out = {
        "ratings": ratings,
        **filled,
        **result,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "command": " ".join(["python", "-m", "benchmarks.datasets", *sys.argv[1:]]),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
