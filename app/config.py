"""Settings: every knob of the service, read from RNNSERVE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RNNSERVE_", env_file=".env", extra="ignore")

    models_dir: Path = Field(Path("models"), description="Directory scanned for checkpoints at startup.")
    default_model: str = Field("shakespeare-lstm", description="Model used when a request names none.")
    redis_url: str | None = Field(None, description="Redis URL for sessions; unset: in-process store.")
    redis_cluster: bool = Field(False, description="Use redis-py's cluster client for RNNSERVE_REDIS_URL.")
    api_keys: str = Field("", description="Comma-separated API keys; empty (and no file): no authentication.")
    api_keys_file: Path | None = Field(None, description="File with one API key per line, added to api_keys.")
    session_ttl: int = Field(86_400, ge=1, description="Seconds a session lives after its last update.")
    max_session_ttl: int = Field(30 * 86_400, ge=1, description="Largest session_ttl a request may ask for.")
    max_sessions: int = Field(10_000, ge=1, description="In-process store: sessions kept (least recently used go).")
    max_prompt_chars: int = Field(100_000, ge=1, description="Longest accepted prompt, in characters.")
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
    step: Literal["onnx", "torch"] = Field(
        "onnx",
        description="Kernels of the batched engine: ONNX Runtime's ('onnx': the fused step, prompts read "
        "together) or torch's ('torch': the fused step, prompts read one at a time).",
    )
    weights: Literal["fp32", "int8"] = Field(
        "fp32",
        description="Weights of the decoding step: the checkpoint's ('fp32'), or 8-bit integers in blocks of 64 "
        "with a scale each ('int8', ONNX Runtime, RNNSERVE_STEP=onnx only): a faster step for a few streams, "
        "prompts still read in fp32.",
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
    log_level: str = Field("info", description="Log level of the service.")

    @model_validator(mode="after")
    def _int8_runs_on_onnx(self) -> Settings:
        if self.weights == "int8" and self.step != "onnx":
            raise ValueError("RNNSERVE_WEIGHTS=int8 needs RNNSERVE_STEP=onnx (the quantized step is ONNX Runtime's)")
        return self

    @property
    def api_key_list(self) -> list[str]:
        keys = [k.strip() for k in self.api_keys.split(",")]
        if self.api_keys_file is not None:
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines()]
        return [k for k in keys if k]


@lru_cache
def get_settings() -> Settings:
    return Settings()
