"""All configuration in one pydantic-settings object, read from ``BEN2Q_*`` variables.

Nothing else in ben2q reads ``os.environ`` for its own settings: code takes a ``Settings``
(or the process-wide ``get_settings()``) so tests and embedders can pass their own.
"""

from __future__ import annotations

import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Precision = Literal["auto", "float32", "float16", "bfloat16"]
Warmup = Literal["auto", "full", "quick", "none"]


class Settings(BaseSettings):
    """Settings of the engine, the library and the CLI (prefix ``BEN2Q_``)."""

    model_config = SettingsConfigDict(env_prefix="BEN2Q_", extra="ignore")

    # --- model -------------------------------------------------------------------------
    model_spec: Literal["base", "tiny"] = Field(
        "base", description="Network variant: 'base' is the real BEN2 Base; 'tiny' is for tests."
    )
    weights: Path | None = Field(
        None, description="Checkpoint (.pth or .safetensors); default: the Hugging Face hub."
    )
    hf_repo_id: str = "PramaLLC/BEN2"
    hf_filename: str = "BEN2_Base.pth"
    hf_revision: str | None = None
    device: str | None = Field(None, description="'cpu', 'cuda', 'cuda:1'; default: auto.")
    precision: Precision = Field(
        "auto",
        description="'auto' is float16 autocast on CUDA, bfloat16 on a CPU with native "
        "bfloat16 (AVX512-BF16 or AMX) and float32 on other CPUs; 'float32' is the "
        "conforming path; reduced precision on a CPU without native support for it falls "
        "back to float32.",
    )
    max_batch: int = Field(4, ge=1, le=64, description="Images per forward pass at most.")
    warmup: Warmup = Field(
        "auto",
        description="The worker's pass before its first job: 'full' (one forward at the "
        "model's input size: the device proves it can hold it, the first job pays no "
        "first-call costs), 'quick' (a forward at a quarter of the side: every kernel "
        "loads, in a fraction of the time), 'none'; 'auto' is full on CUDA, quick on CPU "
        "(a full CPU forward would double the time to the first output, see README).",
    )
    keep_freed_memory: bool = Field(
        False,
        description="CPU: tell glibc malloc to keep freed memory (no page-fault churn on "
        "large temporaries; faster forwards, higher resident memory). See README.",
    )

    # --- input limits ------------------------------------------------------------------
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1, description="Encoded bytes at most.")
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="Decoded pixels at most; also Pillow's bomb guard."
    )

    # --- URL fetching ------------------------------------------------------------------
    allow_private_urls: bool = Field(
        False, description="Allow loopback/private/link-local hosts (tests, trusted networks)."
    )
    fetch_timeout: float = Field(30.0, gt=0, description="Seconds for a whole URL fetch.")
    fetch_connect_timeout: float = Field(5.0, gt=0)
    fetch_max_redirects: int = Field(5, ge=0, le=20)

    # --- queue -------------------------------------------------------------------------
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis).")
    result_backend: str | None = Field(
        None, description="Status/result store; default: the broker URL."
    )
    queue: str = Field("ben2q", description="Queue of the image jobs.")
    batch_queue: str = Field(
        "ben2q-batch",
        description="Queue of the chunks of fanned-out batch jobs; workers take from it only "
        "when the image-job queue is empty.",
    )
    visibility_timeout: int = Field(
        3600,
        ge=10,
        description="Seconds before an unacknowledged job is redelivered (Redis transport); "
        "must exceed the longest job, see the README.",
    )
    job_soft_time_limit: float = Field(300.0, gt=0, description="Seconds per image (soft).")
    job_time_limit: float = Field(360.0, gt=0, description="Seconds per image (hard kill).")
    job_max_attempts: int = Field(3, ge=1, description="Deliveries before a job is failed.")
    retry_backoff_max: int = Field(120, ge=1, description="Longest wait between retries (s).")
    status_ttl: int = Field(7 * 24 * 3600, ge=60, description="Seconds job records are kept.")
    batch_window_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long a job reaching an idle worker waits for companions (ms); "
        "0: it runs at once (jobs arriving while the model is busy are batched anyway).",
    )
    max_batch_items: int = Field(100_000, ge=1, description="Inputs of one batch job at most.")
    batch_chunk: int = Field(
        16,
        ge=0,
        description="A batch job of more inputs fans out into chunks of this many, which "
        "every worker takes from the queue (0: a batch job runs whole on one worker).",
    )
    io_threads: int = Field(8, ge=1, le=64, description="Parallel downloads/uploads per worker.")

    # --- storage -----------------------------------------------------------------------
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO...); credentials via boto3's chain."
    )
    s3_max_attempts: int = Field(5, ge=1, description="boto3 standard-mode attempts per call.")
    local_root: Path | None = Field(
        None, description="Directory that file:// inputs and outputs must lie in; unset: refused."
    )

    # --- webhooks ------------------------------------------------------------------------
    webhook_secret: SecretStr | None = Field(
        None, description="Signing secret of webhooks, 'whsec_' + base64 (Standard Webhooks)."
    )
    webhook_queue: str = Field("ben2q-webhooks", description="Queue of webhook deliveries.")
    unacked_key: str | None = Field(
        None,
        min_length=1,
        description="Redis hash in which a worker keeps the messages it holds (prefetched or "
        "running; the Redis transport's `unacked`). Default: `unacked`, or "
        "`unacked:<BEN2Q_WEBHOOK_QUEUE>` for a worker that consumes only webhook deliveries, "
        "so that the job workers' hash (which an autoscaler counts) never holds webhook "
        "retries waiting for their time.",
    )
    webhook_timeout: float = Field(10.0, gt=0, description="Seconds per delivery attempt.")
    webhook_retry_schedule: list[float] = Field(
        [0, 5, 300, 1800, 7200, 18000, 36000, 36000],
        description="Seconds before each attempt (the Standard Webhooks schedule).",
    )

    # --- operations ----------------------------------------------------------------------
    flower_basic_auth: SecretStr | None = Field(
        None, description="'user:password' for Flower (comma-separate several)."
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="Worker log format: 'json' lines, readable 'text', or 'auto' (text when "
        "standard error is a terminal, JSON otherwise).",
    )
    log_level: str = Field("INFO")

    # --- worker health -------------------------------------------------------------------
    health_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / f"ben2q-health-{os.getuid()}",
        description="Where workers keep their probe files (heartbeat, readiness), read by "
        "`ben2q health --worker`.",
    )
    heartbeat_interval: float = Field(
        5.0, gt=0, le=300, description="Seconds between a worker's heartbeats."
    )
    heartbeat_max_age: float = Field(
        60.0, gt=0, description="`ben2q health`: a heartbeat older than this is a dead worker."
    )
    model_load_timeout: float = Field(
        900.0, gt=0, description="Seconds a worker waits for its model (load + warm-up)."
    )
    worker_max_child_failures: int = Field(
        2,
        ge=1,
        description="A worker leaves service when its pool process dies this many times in "
        "a row without a job finishing in between (keep it below BEN2Q_JOB_MAX_ATTEMPTS, "
        "so a broken worker leaves before it spends a good job's attempts).",
    )

    # --- HTTP API (`ben2q api`) ----------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Address `ben2q api` listens on.")
    api_port: int = Field(8000, ge=0, le=65535, description="Port `ben2q api` listens on.")
    api_workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes.")
    api_output_location: str | None = Field(
        None,
        description="Where outputs of keys without their own output prefix go "
        "(`s3://bucket/outputs/` or `file:///dir/`); each key gets `<id>/` under it.",
    )
    api_upload_location: str | None = Field(
        None,
        description="Where uploads are stored (`s3://bucket/uploads/` or `file:///dir/`); "
        "each key gets `<id>/` under it. Unset: uploads are refused.",
    )
    api_retention: int = Field(
        24 * 3600,
        ge=60,
        description="Seconds uploads and outputs made through the API are kept "
        "(`ben2q retention` applies it; job records say `expires_at`).",
    )
    api_presign_expiry: int = Field(
        3600, ge=1, le=7 * 24 * 3600, description="Seconds a presigned output URL is valid."
    )
    api_presign_endpoint_url: str | None = Field(
        None,
        description="S3 endpoint as clients reach it, for presigned URLs (default: "
        "BEN2Q_S3_ENDPOINT_URL).",
    )
    api_ready_min_workers: int = Field(
        1,
        ge=0,
        description="`/readyz` answers 503 until this many image workers beat recently. 0 for "
        "a fleet that scales its workers to zero (deploy/kubernetes): there, the jobs the API "
        "accepts are what brings workers up.",
    )
    api_max_wait: float = Field(60.0, gt=0, le=600, description="Longest `Prefer: wait=N`.")
    api_remove_timeout: float = Field(
        60.0, gt=0, le=600, description="How long `POST /v1/remove` waits for its job."
    )
    api_max_upload_files: int = Field(
        100, ge=1, description="File parts of one multipart request at most."
    )
    api_max_json_bytes: int = Field(
        1024 * 1024, ge=1024, description="Bytes of a JSON request body at most."
    )
    api_max_queued: int = Field(
        10000,
        ge=1,
        description="Back-pressure: new jobs get 503 while the queue holds more than this.",
    )
    api_rate_requests: int = Field(600, ge=1, description="Requests per minute per key.")
    api_rate_images: int = Field(
        600, ge=1, description="Images submitted per minute per key (a batch counts each)."
    )
    api_idempotency_ttl: int = Field(
        24 * 3600, ge=60, description="Seconds an Idempotency-Key is remembered."
    )
    api_cors_origins: list[str] = Field(
        [], description="Origins browsers may call the API from (JSON list); none by default."
    )
    api_sse_keepalive: float = Field(
        15.0, gt=0, description="Seconds between keep-alive comments on an event stream."
    )
    api_redis_connections: int = Field(
        8,
        ge=2,
        le=1000,
        description="Redis command connections one API process holds at most (requests "
        "beyond them wait their turn); event streams share one more, and sending jobs "
        "uses Celery's broker connections (2 when busy).",
    )

    @property
    def status_url(self) -> str:
        """The Redis URL of job records and events."""
        return self.result_backend or self.broker_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
