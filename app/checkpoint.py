"""The checkpoint format: safetensors weights plus JSON config, vocab and metadata, sha256-verified."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load, save_file

from app.errors import CheckpointError
from app.nn import CharRNN, ModelConfig
from app.vocab import Vocab

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
VOCAB = "vocab.json"
META = "meta.json"  # corpus, training, metrics, loss curve and the weights' sha256
FILES = (WEIGHTS, CONFIG, VOCAB, META)
# a model's (and a corpus's) name: a directory name, never a path; hidden names are work in progress
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


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


def check_name(name: str, what: str = "name") -> str:
    """`name` if it can name a model or corpus directory (letters, digits, '.', '_', '-'; no path), else ValueError."""
    if not NAME.fullmatch(name):
        raise ValueError(
            f"{what} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit; got {name!r}"
        )
    return name


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")


def publish(source: Path, dest: Path) -> None:
    """Put the complete directory `source` at `dest` in one rename; a directory already there is swapped out
    in the same step (a reader sees the old one or the new one, never neither), then removed.

    `source` must be on the same filesystem as `dest` (a hidden sibling, as write_atomically makes).
    """
    try:
        os.rename(source, dest)  # atomic where dest does not exist
        return
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR) or not dest.exists():
            raise
    if not _exchange(source, dest):  # the old directory is gone for a moment: a poll may see it removed
        old = source.with_name(source.name + ".old")
        os.rename(dest, old)
        os.rename(source, dest)
        source = old
    shutil.rmtree(source, ignore_errors=True)  # source now holds the replaced directory


@contextmanager
def write_atomically(directory: Path) -> Iterator[Path]:
    """A hidden temporary sibling of `directory` to fill; published at `directory` when the block ends
    without an exception, else removed. Readers never see a half-written directory."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        tmp.chmod(0o755)  # readable by a service running as another user
        publish(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(directory: Path, model: CharRNN, vocab: Vocab, meta: dict[str, Any]) -> str:
    """Write the checkpoint as a whole directory, atomically (see write_atomically); returns the weights' sha256."""
    # the plain module's keys (never a compiled wrapper's `_orig_mod.` prefix)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with write_atomically(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: deterministic bytes
        (tmp / WEIGHTS).chmod(0o644)
        digest = sha256_file(tmp / WEIGHTS)
        _write_json(tmp / CONFIG, model.config.to_dict())
        _write_json(tmp / VOCAB, {"chars": vocab.chars})
        _write_json(tmp / META, {**meta, "sha256": digest})
    return digest


def update_meta(directory: Path, **fields: Any) -> None:
    """Merge fields into meta.json (the weights and their sha256 are untouched)."""
    meta = json.loads((directory / META).read_text())
    meta.update(fields)
    _write_json(directory / META, meta)


def read_files(directory: Path) -> dict[str, bytes]:
    """The checkpoint's files as bytes, all from one version of the directory (read through one open handle
    of it, so a directory swapped in meanwhile is not mixed in); a missing file is left out."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise CheckpointError(f"{directory.name}: missing directory {directory}") from None
    except OSError as e:
        raise CheckpointError(f"{directory.name}: cannot open the directory ({e.strerror})") from None
    files: dict[str, bytes] = {}
    try:
        for name in FILES:
            try:
                with open(name, "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=fd)) as f:
                    files[name] = f.read()
            except (FileNotFoundError, IsADirectoryError):
                continue
        if WEIGHTS not in files:  # a hint for weights in another format
            others = sorted(n for n in os.listdir(fd) if Path(n).suffix in {".pt", ".pth", ".bin", ".pkl"})
            hint = f" (found {', '.join(others)}: only safetensors weights are loaded)" if others else ""
            raise CheckpointError(f"{directory.name}: missing {WEIGHTS}{hint}")
    finally:
        os.close(fd)
    return files


def _parse_json(name: str, files: dict[str, bytes], key: str) -> Any:
    if key not in files:
        raise CheckpointError(f"{name}: missing {key}")
    try:
        return json.loads(files[key])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{name}: {key} is not valid JSON ({e})") from None


def load_checkpoint(directory: Path) -> Checkpoint:
    """Load and verify a checkpoint; never unpickles. Raises CheckpointError with the reason.

    The weights loaded are the very bytes whose sha256 was checked against meta.json.
    """
    name = directory.name
    files = read_files(directory)
    meta = _parse_json(name, files, META)
    expected = meta.get("sha256") if isinstance(meta, dict) else None
    actual = hashlib.sha256(files[WEIGHTS]).hexdigest()
    if expected != actual:
        raise CheckpointError(f"{name}: sha256 mismatch: {WEIGHTS} is {actual}, meta.json says {expected}")
    try:
        config = ModelConfig(**_parse_json(name, files, CONFIG))
        vocab = Vocab(_parse_json(name, files, VOCAB)["chars"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{name}: invalid config or vocab ({e})") from None
    if config.vocab_size != len(vocab):
        raise CheckpointError(f"{name}: vocab has {len(vocab)} chars, config says {config.vocab_size}")
    try:
        tensors = load(files[WEIGHTS])
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{name}: {WEIGHTS} is not a valid safetensors file ({e})") from None
    model = CharRNN(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{name}: weights do not match config ({e})") from None
    model.eval()
    return Checkpoint(name=name, model=model, vocab=vocab, meta=meta, sha256=actual)
