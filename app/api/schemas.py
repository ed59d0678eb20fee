"""Wire models of the HTTP API (requests validated at the edge, responses documented in OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.engine.inspect import MAX_UNITS
from app.engine.sampling import BEAM_ONLY, SAMPLE_ONLY, Strategy
from app.engine.sequence import FinishReason

MAX_SEED = 2**63 - 1
StopString = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ErrorBody(BaseModel):
    type: str
    message: str
    param: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=128, description="Registry name; default: the default model.")
    prompt: str = Field("", description="Text fed before generating (may be empty).")
    max_tokens: int = Field(200, ge=1, description="Characters to generate, 1..RNNSERVE_MAX_TOKENS_LIMIT.")
    strategy: Strategy = Field("sample", description="Decoding strategy.")
    temperature: float = Field(1.0, gt=0, le=100, description="sample: softmax temperature, > 0.")
    top_k: int = Field(0, ge=0, description="sample: keep the k most likely characters; 0: off.")
    top_p: float = Field(1.0, gt=0, le=1, description="sample: nucleus mass in (0, 1]; 1: off.")
    min_p: float = Field(0.0, ge=0, lt=1, description="sample: drop characters below min_p x the top one; 0: off.")
    beam_width: int = Field(4, ge=2, le=16, description="beam: number of beams, 2..16.")
    stop: list[StopString] = Field(default_factory=list, max_length=8, description="Up to 8 stop strings.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same request and seed: same text.")
    logprobs: int = Field(0, ge=0, le=5, description="Per character: its logprob and the top-n alternatives.")
    unknown_chars: Literal["error", "skip"] = Field("error", description="Characters outside the vocabulary.")
    session_id: str | None = Field(None, max_length=128, description="Continue this session.")
    save_session: bool = Field(True, description="Store the final state and return its session_id.")
    session_ttl: int | None = Field(None, ge=1, description="Seconds the saved session lives (default: server's).")
    stream: bool = Field(False, description="Answer as text/event-stream.")

    @field_validator("temperature", mode="before")
    @classmethod
    def _greedy_is_a_strategy(cls, value: object) -> object:
        # OpenAI's temperature 0 means greedy (and does on /v1); here greedy is its own strategy
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            raise PydanticCustomError(
                "temperature_greedy",
                'temperature: must be greater than 0; for greedy decoding send "strategy": "greedy" '
                "without a temperature",
                {"param": "temperature"},
            )
        return value

    @model_validator(mode="after")
    def _parameters_match_strategy(self) -> GenerateRequest:
        owned = {"sample": SAMPLE_ONLY, "beam": BEAM_ONLY}
        for strategy, names in owned.items():
            if self.strategy == strategy:
                continue
            for name in names:
                if name in self.model_fields_set:
                    raise PydanticCustomError(
                        "strategy_param",
                        "{param} applies only to strategy '{owner}', not '{strategy}'",
                        {"param": name, "owner": strategy, "strategy": self.strategy},
                    )
        return self


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=128, description="Registry name; default: the default model.")
    text: str = Field(..., description="Text to score, up to RNNSERVE_MAX_PROMPT_CHARS characters.")
    session_id: str | None = Field(None, max_length=128, description="Score as this session's continuation.")
    per_char: bool = Field(False, description="Also return each character's logprob.")
    unknown_chars: Literal["error", "skip"] = Field("error", description="Characters outside the vocabulary.")


class CharScore(BaseModel):
    text: str
    logprob: float


class ScoreResponse(BaseModel):
    model: str
    chars: int
    nats_per_char: float
    bits_per_char: float
    perplexity: float
    per_char: list[CharScore] | None = None


MAX_INSPECT_CHARS = 2000
Unit = Annotated[int, Field(ge=0)]


class InspectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=128, description="Registry name; default: the default model.")
    text: str = Field(..., min_length=1, max_length=MAX_INSPECT_CHARS, description="Text to read, 1..2000 chars.")
    layer: int | None = Field(None, ge=0, description="Recurrent layer, 0..num_layers-1; default: the last.")
    state: Literal["h", "c"] = Field("h", description="h: the layer's output; c: the LSTM cell state (lstm only).")
    units: list[Unit] | None = Field(
        None,
        min_length=1,
        max_length=MAX_UNITS,
        description="Unit indices (0..hidden_size-1, at most 64); default: the units that best track the features.",
    )
    top: int = Field(5, ge=1, le=10, description="Next-character predictions per character, 1..10.")
    unknown_chars: Literal["error", "skip"] = Field("error", description="Characters outside the vocabulary.")


class TopChar(BaseModel):
    char: str
    prob: float


class UnitCorrelation(BaseModel):
    unit: int
    r: float


class InspectResponse(BaseModel):
    model: str
    arch: str
    layer: int
    state: Literal["h", "c"]
    hidden_size: int
    text: str = Field(description="The text as read (characters outside the vocabulary removed with skip).")
    units: list[int]
    activations: list[list[float]] = Field(description="Per character (after reading it), one value per unit.")
    top: list[list[TopChar]] = Field(description="Per character, the most likely next characters.")
    features: dict[str, list[UnitCorrelation]] = Field(
        description="column, in_brackets, in_quotes, speaker, line_end: the units most correlated with each "
        "(Pearson r, strongest first; empty where the feature does not vary in the text)."
    )


class SessionInfo(BaseModel):
    session_id: str
    model: str
    model_sha256: str
    chars: int
    tail: str
    created_at: float
    updated_at: float
    expires_at: float


class TopLogprob(BaseModel):
    text: str
    logprob: float


class CharLogprob(BaseModel):
    text: str
    logprob: float
    top_logprobs: list[TopLogprob]


class Usage(BaseModel):
    prompt_chars: int
    completion_chars: int
    session_chars: int


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: FinishReason
    session_id: str | None
    seed: int
    usage: Usage
    logprobs: list[CharLogprob] | None = None


class ModelInfo(BaseModel):
    name: str
    arch: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    parameters: int
    corpus: str | None
    val_nats_per_char: float | None
    test_nats_per_char: float | None
    sha256: str


class ModelDetail(ModelInfo):
    vocab: str


class ModelList(BaseModel):
    default: str | None
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    models: int
    store: str
    store_ok: bool


class TrainingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        max_length=64,
        description="Name of the model to make (models/NAME/): letters, digits, '-' or '_', starting with a "
        "letter or digit.",
    )
    text: str = Field(description="The text to learn from (UTF-8; at most RNNSERVE_MAX_TRAINING_TEXT_BYTES).")
    arch: Literal["rnn", "lstm", "gru"] = Field("lstm", description="Recurrent cell.")
    hidden_size: int = Field(256, ge=8, description="Units per layer, 8..RNNSERVE_MAX_TRAINING_HIDDEN_SIZE.")
    num_layers: int = Field(2, ge=1, description="Stacked layers, 1..RNNSERVE_MAX_TRAINING_LAYERS.")
    minutes: float = Field(2.0, gt=0, description="Training time, up to RNNSERVE_MAX_TRAINING_MINUTES.")
    overwrite: bool = Field(False, description="Replace an existing model of this name that this key trained.")


class TrainingProgress(BaseModel):
    step: int
    chars: int = Field(description="Characters trained on so far.")
    train_loss: float | None = Field(description="Training loss (smoothed), nats/char.")
    val_loss: float | None = Field(description="Latest loss on the held-out validation text, nats/char.")
    elapsed_s: float = Field(description="Seconds of training so far (evaluations not counted).")
    chars_per_s: float | None = None


class TrainingPoint(BaseModel):
    step: int
    elapsed_s: float
    train_loss: float | None
    val_loss: float | None


class Training(BaseModel):
    id: str
    name: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    arch: str
    hidden_size: int
    num_layers: int
    minutes: float
    overwrite: bool
    text_chars: int
    progress: TrainingProgress
    curve: list[TrainingPoint] = Field(description="The loss curve so far (thinned to at most 200 points).")
    error: str | None = Field(description="Why the job failed.")
    metrics: dict[str, float] | None = Field(
        description="Held-out nats/char and bits/char of the finished model (val_*, test_*)."
    )
    created_at: float
    started_at: float | None
    finished_at: float | None


class TrainingList(BaseModel):
    trainings: list[Training]
