"""All configuration: one pydantic-settings object read from `TRAINBOX_*` environment variables.

Built once (`get_settings()`) and validated at start, so a bad value fails the start with a clear
message instead of the first request.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.tokencache import DEFAULT_TOKEN_CACHE_BYTES


class Settings(BaseSettings):
    """trainbox settings; every field can be set as `TRAINBOX_<FIELD>` (e.g. TRAINBOX_DATABASE_URL)."""

    model_config = SettingsConfigDict(env_prefix="TRAINBOX_", extra="ignore", validate_default=True)

    data_dir: Path = Field(Path(".trainbox"), description="base directory for the embedded defaults")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite file under data_dir")
    redis_url: str | None = Field(None, description="None: `trainbox up` starts an embedded server")
    runs_root: Path | None = Field(None, description="run directories; default data_dir/runs")
    model_root: Path | None = Field(None, description="local model directories; default data_dir/models")
    data_root: Path | None = Field(None, description="training data; default data_dir/data")

    box_name: str = Field(default_factory=socket.gethostname, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    cpu_slots: int = Field(2, ge=1, le=256, description="slots a box without GPUs offers")

    heartbeat_s: float = Field(5.0, gt=0, description="how often a supervisor renews its lease")
    lease_s: float = Field(30.0, gt=0, description="a lease not renewed for this long is expired")
    sweep_interval_s: float = Field(10.0, gt=0, description="period of the scheduler/reaper sweep")
    cancel_grace_s: float = Field(30.0, ge=0, description="SIGTERM -> SIGKILL delay on cancel/timeout")
    stream_maxlen: int = Field(10000, ge=100, description="approximate cap of each job's event stream")
    max_attempts: int = Field(3, ge=1, le=100, description="runs of one job before it fails as `lost`")
    start_timeout_s: float = Field(
        600.0, gt=0, description="a job whose ranks emit no `start` event within this fails as launch_error"
    )
    torch_extensions_dir: Path | None = Field(
        None, description="DeepSpeed's JIT-built ops (TORCH_EXTENSIONS_DIR); default data_dir/torch_extensions"
    )

    # Limits per user; each can be overridden per user by an admin (`trainbox-admin users set`).
    max_gpus_per_user: int | None = Field(None, ge=1, description="GPUs one user's jobs hold at once; None: no cap")
    max_queued_per_user: int = Field(50, ge=1, description="jobs one user may have waiting in the queue")
    max_runtime_s: int = Field(7 * 86400, ge=1, description="cap on a spec's max_runtime_s")
    max_priority: int = Field(0, ge=-100, le=100, description="highest priority a non-admin may ask for")
    submit_rate_per_minute: int = Field(60, ge=1, description="POST /jobs per user per minute (needs Redis)")
    max_datasets_per_user: int = Field(100, ge=1, description="uploaded datasets one user may keep")
    max_dataset_bytes_per_user: int = Field(10 << 30, ge=1024, description="total bytes of one user's uploads")
    max_tokens_per_user: int = Field(20, ge=1, description="live API tokens one user may hold (made through the API)")
    auth_cache_s: float = Field(
        5.0,
        ge=0,
        le=60,
        description="seconds an API process remembers an authenticated token: a revoked token, a deleted user or "
        "changed limits take effect within this bound (at once through the API process that made the change); "
        "0: look every token up",
    )
    max_disk_bytes_per_user: int | None = Field(
        None, ge=1, description="disk one user's run directories and uploads may use; at or over it, no submission"
    )
    # Disk: the worker's sweep deletes finished jobs' checkpoints this many days after they finished.
    checkpoint_retention_days: float | None = Field(
        None, ge=0, description="days a finished job's checkpoints are kept (model/ and logs stay); None: forever"
    )
    token_cache_bytes: int = Field(
        DEFAULT_TOKEN_CACHE_BYTES,
        ge=0,
        description="bound of the tokenized-data cache under the data root, shared by jobs on the same data "
        "(least recently used entries evicted beyond it; `trainbox prune` deletes entries unused for its N "
        "days); 0: each job tokenizes into its run dir",
    )
    # Request hardening.
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body (uploads excepted) -> 413")
    max_upload_bytes: int = Field(256 << 20, ge=1024, description="largest dataset upload -> 413")
    max_json_depth: int = Field(32, ge=4, le=1000, description="deepest JSON nesting accepted in a body")
    metrics_public: bool = Field(False, description="serve /metrics without a token (a private scrape network)")
    # The memory check at submission: a spec whose estimated memory per GPU exceeds the best box's is a 422.
    assumed_gpu_memory_gb: float = Field(
        24.0, ge=0, description="GB per GPU assumed while no box has registered (the reference box); 0: no check"
    )
    cpu_box_memory_gb: float | None = Field(
        None, gt=0, description="host memory of a CPU box, shared by its ranks; None: this machine's RAM"
    )

    sse_block_ms: int = Field(5000, ge=10, le=60000, description="XREAD BLOCK per SSE poll")
    # Admission (api/admission.py): what the API takes on at once; the DB and Redis pools follow from it.
    api_max_inflight: int = Field(
        24, ge=1, le=32, description="requests handled at once (below anyio's 40 worker threads); more wait, then 503"
    )
    api_max_inflight_per_user: int = Field(6, ge=1, description="requests of one user handled at once; more: 429")
    api_admission_wait_s: float = Field(1.0, ge=0, le=30, description="how long a request waits for a slot -> 503")
    api_max_streams: int = Field(500, ge=1, le=10000, description="open event streams (SSE) in all; more: 503")
    api_max_streams_per_user: int = Field(32, ge=1, description="open event streams of one user; more: 429")
    stack_file: Path | None = Field(
        None, description="set by `trainbox up`: its record of the children and their restarts, shown in /healthz"
    )

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'trainbox.db'}"
        self.database_url = normalize_database_url(self.database_url)
        self.runs_root = (self.runs_root or self.data_dir / "runs").expanduser().resolve()
        self.model_root = (self.model_root or self.data_dir / "models").expanduser().resolve()
        self.data_root = (self.data_root or self.data_dir / "data").expanduser().resolve()
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, got {self.redis_url!r}")
        if self.lease_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"lease_s ({self.lease_s}) must be at least twice heartbeat_s ({self.heartbeat_s}), "
                "or one late heartbeat would expire a healthy job"
            )
        return self

    @property
    def extensions_dir(self) -> Path:
        """The op cache the worker builds at start and its ranks load from (TORCH_EXTENSIONS_DIR)."""
        return (self.torch_extensions_dir or self.data_dir / "torch_extensions").expanduser().resolve()

    @property
    def box_ttl_s(self) -> float:
        """A box whose worker has not said it is alive for this long gets no new jobs."""
        return self.lease_s * 3

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def token_file(self) -> Path:
        """Where `trainbox up` keeps the local admin's token (mode 0600); the CLI reads it."""
        return self.data_dir / "token"

    def run_dir(self, job_id: str) -> Path:
        """Where a job's run directory lives (see docs/TRAINER.md for its layout)."""
        assert self.runs_root is not None
        return self.runs_root / job_id


def normalize_database_url(url: str) -> str:
    """Pin Postgres URLs to the psycopg 3 driver; refuse in-memory SQLite (each connection is a new DB)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    if url.startswith("sqlite"):
        if url in ("sqlite://", "sqlite:///:memory:") or ":memory:" in url:
            raise ValueError("database_url: in-memory SQLite is not supported; name a file")
        return url
    if url.startswith("postgresql+psycopg://"):
        return url
    raise ValueError(f"database_url must be a sqlite:/// or postgresql:// URL, got {url.split(':')[0]}://...")


class SettingsError(RuntimeError):
    """The environment holds an invalid TRAINBOX_* value; the message names each bad field."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once; SettingsError names what is wrong."""
    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"TRAINBOX_{'_'.join(str(p) for p in err['loc']).upper() or '*'}: "
            + str(err["msg"]).removeprefix("Value error, ")
            for err in e.errors()
        )
        raise SettingsError(f"invalid trainbox settings: {problems}") from None
