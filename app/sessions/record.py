"""SessionRecord: everything needed to continue a sequence exactly, and its compact binary codec."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from app.nn import State, state_from_parts, state_parts

TAIL_CHARS = 200
MAGIC = b"RNS1"


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    owner: str  # a digest of the API key that created it; "" without authentication
    model: str
    model_sha256: str
    state: bytes  # encode_state(...)
    last: str  # the last character: the input of the next step
    generator_state: bytes  # torch.Generator state of the sampler
    seed: int
    chars: int  # characters the state has read
    tail: str  # the last TAIL_CHARS of them
    created_at: float
    updated_at: float
    expires_at: float
    version: int = 1

    def to_bytes(self) -> bytes:
        """MAGIC, header length, JSON header, then the state and generator bytes."""
        header = {k: v for k, v in asdict(self).items() if k not in ("state", "generator_state", "lease")}
        header["sizes"] = [len(self.state), len(self.generator_state)]
        head = json.dumps(header, separators=(",", ":")).encode()
        return MAGIC + len(head).to_bytes(4, "little") + head + self.state + self.generator_state

    @classmethod
    def from_bytes(cls, blob: bytes) -> SessionRecord:
        try:
            if blob[:4] != MAGIC:
                raise ValueError("bad magic")
            n = int.from_bytes(blob[4:8], "little")
            header = json.loads(blob[8 : 8 + n])
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
            state_len, gen_len = header.pop("sizes")
            body = blob[8 + n :]
            if len(body) != state_len + gen_len:
                raise ValueError("truncated")
            return cls(**header, state=body[:state_len], generator_state=body[state_len:])
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"corrupt session record ({e})") from None

    def evolve(self, **changes: object) -> SessionRecord:
        return replace(self, **changes)  # type: ignore[arg-type]


def encode_state(state: State) -> bytes:
    """A recurrent state (batch 1) as safetensors bytes: h, and c for an LSTM."""
    return save({name: t.contiguous() for name, t in zip(("h", "c"), state_parts(state), strict=False)})


def decode_state(blob: bytes, arch: str, num_layers: int, hidden_size: int) -> State:
    """The inverse of encode_state, checking shape and dtype against the model."""
    try:
        tensors = load(blob)
    except SafetensorError as e:
        raise ValueError(f"state is not a safetensors blob ({e})") from None
    names = ("h", "c") if arch == "lstm" else ("h",)
    if sorted(tensors) != sorted(names):
        raise ValueError(f"state has tensors {sorted(tensors)}, expected {list(names)}")
    for name in names:
        t = tensors[name]
        if tuple(t.shape) != (num_layers, 1, hidden_size) or t.dtype != torch.float32:
            raise ValueError(
                f"state tensor {name} is {tuple(t.shape)} {t.dtype}, expected ({num_layers}, 1, {hidden_size})"
            )
    return state_from_parts([tensors[name] for name in names])


def generator_bytes(state: Tensor) -> bytes:
    return state.numpy().tobytes()


def generator_tensor(blob: bytes) -> Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)
