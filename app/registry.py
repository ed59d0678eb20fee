"""The model registry: scans the models directory, verifies and loads every checkpoint, looks them up."""

from __future__ import annotations

import logging
from pathlib import Path

from app.checkpoint import Checkpoint, load_checkpoint
from app.errors import CheckpointError, NotFoundError

log = logging.getLogger(__name__)


class Registry:
    def __init__(self, models: dict[str, Checkpoint], default: str | None) -> None:
        self.models = models
        self.default = default

    @classmethod
    def load(cls, models_dir: Path, default: str | None = None) -> Registry:
        """Load every `models_dir/<name>/`; a broken checkpoint is logged and skipped."""
        models: dict[str, Checkpoint] = {}
        if not models_dir.is_dir():
            log.error("models directory %s does not exist; serving no models", models_dir)
        else:
            for path in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                try:
                    models[path.name] = load_checkpoint(path)
                except CheckpointError as e:
                    log.error("refusing checkpoint %s: %s", path, e.message)
                    continue
                log.info("loaded model %s (sha256 %s)", path.name, models[path.name].sha256[:12])
        if default not in models:
            fallback = next(iter(models), None)
            if default is not None:
                log.warning("default model %r is not loaded; default is %r", default, fallback)
            default = fallback
        return cls(models, default)

    def get(self, name: str | None) -> Checkpoint:
        """The checkpoint called `name` (the default model when None)."""
        key = name if name is not None else self.default
        if key is None or key not in self.models:
            available = ", ".join(self.models) or "none"
            raise NotFoundError(f"model {key!r} not found; available models: {available}", param="model")
        return self.models[key]

    def __len__(self) -> int:
        return len(self.models)
