"""Settings for every process of the app, read from `SELFTUNE_*` environment variables."""

from __future__ import annotations

import ipaddress
import re
import sys
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The heartbeats a run's worker may miss, or send late, before its run is called lost: the run
# page says "no word from its worker" past as many (app.routers.runs.silent_seconds).
MISSED_HEARTBEATS = 3
# The SQLite database's file in the data directory, unless SELFTUNE_DATABASE_URL names another.
SQLITE_FILE = "selftune.db"


class Settings(BaseSettings):
    """One place for configuration; nothing else reads os.environ for app settings."""

    # An error names the setting but never echoes its value (the token would end up in logs).
    model_config = SettingsConfigDict(env_prefix="SELFTUNE_", extra="ignore",
                                      hide_input_in_errors=True)

    data_dir: Path = Field(Path("./data"), description="Datasets, runs, caches, SQLite, Redis")
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset = SQLite in data dir")
    redis_url: str | None = Field(None, description="Redis URL; unset = embedded Redis server")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_token: SecretStr | None = Field(None, description="Bearer token; unset = no auth")
    allow_public_without_token: bool = Field(
        False, description="Bind a non-loopback host without a token (you were warned)"
    )

    # Upload limits (checked while streaming and while reading the archive).
    max_upload_bytes: int = Field(4 * 1024**3, ge=1)
    max_archive_files: int = Field(200_000, ge=1)
    max_uncompressed_bytes: int = Field(16 * 1024**3, ge=1)
    max_compression_ratio: float = Field(200.0, gt=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    holdout_seed: int = 0

    # Experiments and workers.
    max_runs_per_experiment: int = Field(60, ge=1)
    worker_device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    worker_concurrency: int = Field(1, ge=1, description="training processes per worker")
    visibility_timeout_s: int = Field(7 * 24 * 3600, ge=60)
    event_stream_maxlen: int = Field(20_000, ge=100)
    heartbeat_interval_s: float = Field(10.0, gt=0)
    stale_after_s: float = Field(120.0, gt=0, description="heartbeat silence = lost run; at "
                                 f"least {MISSED_HEARTBEATS} heartbeats")
    max_attempts: int = Field(3, ge=1, description="automatic requeues of a lost run")
    sse_heartbeat_s: float = Field(10.0, gt=0)
    preload_engine: bool = Field(
        True, description="the web imports torch and timm as it starts, not on its first "
        "experiment check")

    @field_validator("api_token")
    @classmethod
    def _token_fits_a_header(cls, value: SecretStr | None) -> SecretStr | None:
        # It travels in an Authorization header and a cookie: printable ASCII only, or no
        # client could send it (and the login page could not set its cookie).
        if value is not None and not all(" " < char < "\x7f" for char in value.get_secret_value()):
            raise ValueError("must be printable ASCII without spaces (letters, digits, "
                             "punctuation)")
        return value

    @field_validator("worker_device")
    @classmethod
    def _a_device_torch_names(cls, value: str) -> str:
        # Taken, "gpu" failed every run with torch's list of device types, and the health
        # page showed the device probe's Python source.
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N (N a GPU's index), not "
                             f"{value!r}")
        return value

    @field_validator("stale_after_s")
    @classmethod
    def _stale_after_some_heartbeats(cls, value: float, info: ValidationInfo) -> float:
        # Refused, not warned of: at one heartbeat or less every run still training is called
        # lost between two of them, under three at the first one late (a busy database, a
        # paused process), and queued again until its attempts are spent, then lost for good,
        # hours into a run; a warning at start is long gone from the log by then. Nothing
        # needs it: to find lost runs sooner, lower both.
        interval = info.data.get("heartbeat_interval_s")  # absent when it was refused itself
        if interval is not None and value < MISSED_HEARTBEATS * interval:
            raise ValueError(
                f"must be at least {MISSED_HEARTBEATS} heartbeats, "
                f"{MISSED_HEARTBEATS * interval:g} s with SELFTUNE_HEARTBEAT_INTERVAL_S at "
                f"{interval:g} s: a run whose worker is silent this long is declared lost and "
                "queued again, and a heartbeat can be late under load (to find lost runs "
                "sooner, lower both)")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / SQLITE_FILE}"

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def effective_redis_url(self) -> str:
        """The Redis to use; `make run` sets SELFTUNE_REDIS_URL to its embedded server."""
        if not self.redis_url:
            raise RuntimeError(
                "SELFTUNE_REDIS_URL is not set: start the app with `make run` (it starts an "
                "embedded Redis) or point SELFTUNE_REDIS_URL at a Redis server"
            )
        return self.redis_url

    @property
    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None

    def is_loopback_host(self) -> bool:
        if self.host in ("localhost", ""):
            return self.host == "localhost"
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def refusal_lines(exc: ValidationError) -> list[str]:
    """What is wrong with the settings, a line each, the setting named as it is set."""
    return [f"SELFTUNE_{'_'.join(map(str, error['loc'])).upper()}: "
            f"{error['msg'].removeprefix('Value error, ')}" for error in exc.errors()]


def settings_or_exit(process: str) -> Settings:
    """The settings, or the process (the web, a worker, `make run`) exits with status 2
    saying what to fix, a line a setting: a traceback named pydantic's field
    (stale_after_s), not the variable."""
    try:
        return get_settings()
    except ValidationError as exc:
        for line in refusal_lines(exc):
            print(f"[selftune] {process} cannot start: {line}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


@lru_cache
def get_settings() -> Settings:
    return Settings()
