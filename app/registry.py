"""The model registry: scans the models directory, verifies and loads checkpoints (again on change), looks them up."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from app.checkpoint import META, WEIGHTS, Checkpoint, load_checkpoint
from app.errors import CheckpointError, NotFoundError

log = logging.getLogger(__name__)

# what a directory looked like when it was last read: (inode, mtime_ns, size) of meta.json and of the weights
Fingerprint = tuple[tuple[int, int, int] | None, ...]


def fingerprint(directory: Path) -> Fingerprint:
    """Changes whenever a checkpoint's files are rewritten or its directory is swapped for another."""

    def stat(name: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(directory / name)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    return stat(META), stat(WEIGHTS)


def model_dirs(models_dir: Path) -> dict[str, Path] | None:
    """`models_dir/<name>/` by name (None where the directory cannot be read); hidden directories
    (checkpoints being written) are not models."""
    try:
        entries = sorted(models_dir.iterdir())
    except OSError:
        return None
    return {p.name: p for p in entries if not p.name.startswith(".") and p.is_dir()}


@dataclass
class Changes:
    """What a scan of the models directory found, relative to what the registry serves (plain data)."""

    added: dict[str, Checkpoint] = field(default_factory=dict)
    replaced: dict[str, Checkpoint] = field(default_factory=dict)  # new weights (a new sha256) of a served name
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # name -> why (the served version, if any, stays)
    meta: dict[str, dict] = field(default_factory=dict)  # same weights, new meta.json (metrics added)

    def __bool__(self) -> bool:
        return bool(self.added or self.replaced or self.removed or self.refused or self.meta)


class Registry:
    def __init__(
        self,
        models: dict[str, Checkpoint],
        default: str | None,
        models_dir: Path | None = None,
        wanted: str | None = None,
    ) -> None:
        self.models = models
        self.default = default
        self.models_dir = models_dir
        self.wanted = wanted if wanted is not None else default  # the configured default
        self.seen: dict[str, Fingerprint] = {}  # what each directory looked like when last read
        self.refused: dict[str, Fingerprint] = {}  # directories refused as they are now: not retried by a poll

    @classmethod
    def load(cls, models_dir: Path, default: str | None = None) -> Registry:
        """Load every `models_dir/<name>/`; a broken checkpoint is logged and skipped."""
        registry = cls({}, None, models_dir, default)
        if not models_dir.is_dir():
            log.error("models directory %s does not exist; serving no models", models_dir)
        registry.apply(registry.scan())
        if default is not None and default not in registry.models:
            log.warning("default model %r is not loaded; default is %r", default, registry.default)
        return registry

    def scan(self, retry_refused: bool = False) -> Changes:
        """Read the directory and load what changed (blocking: checkpoints are hashed and built); changes nothing.

        A directory refused as it is now is tried again only with `retry_refused`.
        """
        changes = Changes()
        if self.models_dir is None:
            return changes
        found = model_dirs(self.models_dir)
        if found is None:  # unreadable (a volume not mounted yet): what is served stays served
            if self.models:
                log.warning("cannot read the models directory %s; serving what was loaded", self.models_dir)
            return changes
        changes.removed = [name for name in self.models if name not in found]
        for name, path in found.items():
            mark = fingerprint(path)
            if name in self.models and self.seen.get(name) == mark:
                continue
            if not retry_refused and self.refused.get(name) == mark:
                continue
            served = self.models.get(name)
            if served is not None and self._declared_sha256(path) == served.sha256:
                with contextlib.suppress(OSError, ValueError):  # being rewritten: read on a later scan
                    changes.meta[name] = json.loads((path / META).read_text())
                self.seen[name] = mark
                continue
            try:
                ckpt = load_checkpoint(path)
            except CheckpointError as e:
                log.error("refusing checkpoint %s: %s", path, e.message)
                changes.refused[name] = e.message
                self.refused[name] = mark
                continue
            self.refused.pop(name, None)
            self.seen[name] = mark
            if served is None:
                changes.added[name] = ckpt
            elif ckpt.sha256 != served.sha256:
                changes.replaced[name] = ckpt
        return changes

    @staticmethod
    def _declared_sha256(path: Path) -> str | None:
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            return None
        return meta.get("sha256") if isinstance(meta, dict) else None

    def apply(self, changes: Changes) -> None:
        """Serve what a scan found: new requests see it from now on."""
        for name, ckpt in {**changes.added, **changes.replaced}.items():
            self.models[name] = ckpt
            log.info("loaded model %s (sha256 %s)", name, ckpt.sha256[:12])
        for name, meta in changes.meta.items():
            if name in self.models and meta.get("sha256") == self.models[name].sha256:
                self.models[name].meta = meta  # the same weights, their metrics written after training
        for name in changes.removed:
            self.models.pop(name, None)
            self.seen.pop(name, None)
            log.info("model %s is gone from %s: no longer served", name, self.models_dir)
        self.models = dict(sorted(self.models.items()))
        self.default = self.wanted if self.wanted in self.models else next(iter(self.models), None)

    def get(self, name: str | None) -> Checkpoint:
        """The checkpoint called `name` (the default model when None)."""
        key = name if name is not None else self.default
        if key is None or key not in self.models:
            available = ", ".join(self.models) or "none"
            raise NotFoundError(f"model {key!r} not found; available models: {available}", param="model")
        return self.models[key]

    def __len__(self) -> int:
        return len(self.models)
