"""The checkpoint format: safetensors weights plus JSON config, vocab and metadata, sha256-verified."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from app.errors import CheckpointError
from app.nn import CharRNN, ModelConfig
from app.vocab import Vocab

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
META = "meta.json"  # corpus, training, metrics, loss curve and the weights' sha256


@dataclass
class Checkpoint:
    name: str
    model: CharRNN
    vocab: Vocab
    meta: dict[str, Any]
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(directory: Path, model: CharRNN, vocab: Vocab, meta: dict[str, Any]) -> str:
    """Write the checkpoint atomically file by file; returns the weights' sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    # the plain module's keys (never a compiled wrapper's `_orig_mod.` prefix)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})  # one key: the file's bytes are deterministic
    tmp.chmod(0o644)  # readable by a service running as another user
    os.replace(tmp, directory / WEIGHTS)
    digest = sha256_file(directory / WEIGHTS)
    _write_json(directory / CONFIG, model.config.to_dict())
    _write_json(directory / VOCAB, {"chars": vocab.chars})
    _write_json(directory / META, {**meta, "sha256": digest})
    return digest


def update_meta(directory: Path, **fields: Any) -> None:
    """Merge fields into meta.json (the weights and their sha256 are untouched)."""
    meta = json.loads((directory / META).read_text())
    meta.update(fields)
    _write_json(directory / META, meta)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent.name}: missing {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path.parent.name}: {path.name} is not valid JSON ({e})") from None


def load_checkpoint(directory: Path) -> Checkpoint:
    """Load and verify a checkpoint; never unpickles. Raises CheckpointError with the reason."""
    name = directory.name
    weights = directory / WEIGHTS
    if not weights.is_file():
        listing = directory.iterdir() if directory.is_dir() else iter(())
        others = sorted(p.name for p in listing if p.suffix in {".pt", ".pth", ".bin", ".pkl"})
        hint = f" (found {', '.join(others)}: only safetensors weights are loaded)" if others else ""
        raise CheckpointError(f"{name}: missing {WEIGHTS}{hint}")
    meta = _read_json(directory / META)
    expected = meta.get("sha256") if isinstance(meta, dict) else None
    actual = sha256_file(weights)
    if expected != actual:
        raise CheckpointError(f"{name}: sha256 mismatch: {WEIGHTS} is {actual}, meta.json says {expected}")
    try:
        config = ModelConfig(**_read_json(directory / CONFIG))
        vocab = Vocab(_read_json(directory / VOCAB)["chars"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{name}: invalid config or vocab ({e})") from None
    if config.vocab_size != len(vocab):
        raise CheckpointError(f"{name}: vocab has {len(vocab)} chars, config says {config.vocab_size}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{name}: {WEIGHTS} is not a valid safetensors file ({e})") from None
    model = CharRNN(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{name}: weights do not match config ({e})") from None
    model.eval()
    return Checkpoint(name=name, model=model, vocab=vocab, meta=meta, sha256=actual)
