"""Settings: every knob of the service, read from RNNSERVE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engine.config import Backend, EngineConfig, Weights


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", env_file=".env", extra="ignore")

    models_dir: Path = Field(Path("models"), description="Directory of the checkpoints served, one per subdirectory.")
    models_poll_seconds: float = Field(
        10.0,
        ge=0,
        description="Seconds between scans of RNNSERVE_MODELS_DIR for new, replaced or removed checkpoints "
        "(POST /admin/models/reload scans at once); 0: only at startup and on that call.",
    )
    default_model: str = Field("shakespeare-lstm", description="Model used when a request names none.")
    redis_url: str | None = Field(None, description="Redis URL for sessions; unset: in-process store.")
    redis_cluster: bool = Field(False, description="Use redis-py's cluster client for RNNSERVE_REDIS_URL.")
    api_keys: str = Field("", description="Comma-separated API keys; empty (and no file): no authentication.")
    api_keys_file: Path | None = Field(None, description="File with one API key per line, added to RNNSERVE_API_KEYS.")
    admin_keys: str = Field(
        "",
        description="Comma-separated admin keys: only they may use /admin/* and /trainings (they are API keys "
        "too). Unset: those routes are open without API keys, refused (403) with them.",
    )
    session_ttl: int = Field(86_400, ge=1, description="Seconds a session lives after its last update.")
    max_session_ttl: int = Field(30 * 86_400, ge=1, description="Largest `session_ttl` a request may ask for.")
    max_sessions: int = Field(10_000, ge=1, description="In-process store: sessions kept (least recently used go).")
    lease_seconds: float = Field(
        10.0,
        gt=0,
        description="Seconds a continuation holds its session without renewing; renewed while it runs, so a "
        "replica that dies frees its sessions within about this long.",
    )
    max_prompt_chars: int = Field(100_000, ge=1, description="Longest accepted prompt (or /score text), in chars.")
    max_tokens_limit: int = Field(10_000, ge=1, description="Largest accepted max_tokens.")
    max_batch: int = Field(128, ge=1, description="Generations advanced together in one step, per model.")
    max_running_per_key: int = Field(64, ge=1, description="Generations one API key may run at once; beyond: 429.")
    rate_limit_per_minute: int = Field(
        0,
        ge=0,
        description="Requests per minute per API key (per client address without keys), shared "
        "across replicas through Redis when RNNSERVE_REDIS_URL is set; 0: off.",
    )
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS ('*' for any); empty: off.")
    engine: Literal["batched", "naive"] = Field(
        "batched", description="'naive': the unbatched baseline of `rnnserve bench` (one request at a time)."
    )
    step: Backend = Field(
        Backend.ONNX,
        description="Kernels of the batched engine: ONNX Runtime's ('onnx': the fused step, prompts prefilled "
        "together) or torch's ('torch': the fused step, prompts prefilled one at a time); 'naive' is "
        "RNNSERVE_ENGINE=naive.",
    )
    weights: Weights = Field(
        Weights.FP32,
        description="Weights of the decoding step: the checkpoint's ('fp32'), or 8-bit integers in blocks of 64 "
        "with a scale each ('int8', ONNX Runtime, RNNSERVE_STEP=onnx only): a faster step for a few streams, "
        "prompts still prefilled in fp32.",
    )
    step_budget_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="Milliseconds of decoding steps per trip to the compute thread before the streams get "
        "their characters (at least 1 ms per running stream; a new request, a first character or a finished row "
        "ends a trip sooner); 0: one step.",
    )
    max_queue: int = Field(256, ge=0, description="Generations waiting for a slot, per model; beyond: 429.")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest accepted request body; beyond: 413.")
    max_ws_message_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="Largest accepted WebSocket message; beyond: close 1009."
    )
    sse_keepalive_seconds: float = Field(15.0, gt=0, description="Idle seconds before an SSE keep-alive comment.")
    shutdown_grace_seconds: float = Field(
        20.0, ge=0, description="On SIGTERM: seconds running generations may go on before they are cancelled."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Threads of each kernel (torch's and ONNX Runtime's pools); 0: the CPUs this process may use "
        "(the smaller of its cgroup CPU quota, rounded up, and its CPU affinity).",
    )
    log_level: str = Field("info", description="Log level; logs are JSON lines with the request id, never a prompt.")
    max_training_text_bytes: int = Field(
        1_000_000, ge=1, description="Largest text a training job accepts, in UTF-8 bytes; beyond: 413."
    )
    max_training_minutes: float = Field(60.0, gt=0, description="Longest training time a job may ask for.")
    max_training_hidden_size: int = Field(1024, ge=8, description="Largest hidden_size a training job may ask for.")
    max_training_layers: int = Field(4, ge=1, description="Largest num_layers a training job may ask for.")
    max_trainings_per_key: int = Field(
        2, ge=1, description="Training jobs one API key may have queued or running at once; beyond: 429."
    )
    training_ttl: int = Field(
        7 * 86_400, ge=60, description="Seconds a finished training job's record is kept (its model stays)."
    )
    training_threads: int = Field(
        0, ge=0, description="torch threads of a training job; 0: the CPUs the worker may use."
    )

    @model_validator(mode="after")
    def _valid_engine(self) -> Settings:
        try:
            self.engine_config()
        except ValueError as e:
            raise ValueError(f"RNNSERVE_ENGINE, RNNSERVE_STEP, RNNSERVE_WEIGHTS: {e}") from None
        return self

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch=self.max_batch,
            max_queue=self.max_queue,
            backend=Backend.NAIVE if self.engine == "naive" else self.step,
            weights=self.weights,
            step_budget=self.step_budget_ms / 1000,
        )

    @property
    def api_key_list(self) -> list[str]:
        keys = [k.strip() for k in self.api_keys.split(",")]
        if self.api_keys_file is not None:
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines()]
        return [k for k in keys if k]

    @property
    def admin_key_list(self) -> list[str]:
        return [k for k in (k.strip() for k in self.admin_keys.split(",")) if k]


@lru_cache
def get_settings() -> Settings:
    return Settings()
