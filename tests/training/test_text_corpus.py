"""Any text as a corpus: one file split in blocks, a directory split by file, clear errors, sized training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from app import cli
from app.checkpoint import load_checkpoint
from app.nn import CharRNN, ModelConfig
from app.training.corpus import (
    MIN_TEXT_CHARS,
    SPLITS,
    CorpusError,
    normalise,
    prepare_path,
    prepare_text,
    split_blocks,
    split_by_hash,
)
from app.training.sizing import parameters, sized_defaults
from app.training.trainer import StreamBatches, TrainConfig


def poem(lines: int) -> str:
    return "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(lines))


def test_one_file_is_split_in_contiguous_blocks_at_line_boundaries(tmp_path: Path) -> None:
    text = poem(400)
    (tmp_path / "poem.txt").write_text(text)
    corpus = prepare_path(tmp_path / "poem.txt", "poem", tmp_path / "data")
    train, val, test = (corpus.text(s) for s in ("train", "val", "test"))
    assert train + test + val == text  # in order: the last block validation, the one before it test
    for split in (train, test, val):
        assert split and split.endswith("\n")  # cut at line boundaries
    assert abs(len(val) - 0.05 * len(text)) <= 60 and abs(len(test) - 0.05 * len(text)) <= 60
    m = corpus.manifest
    assert m["name"] == "poem" and m["split"] == "blocks"
    assert m["chars"] == {"train": len(train), "val": len(val), "test": len(test)}
    assert m["vocab"] == "".join(sorted(set(text)))
    assert m["works"]["val"] == [f"poem.txt, lines {400 - val.count(chr(10)) + 1}-400"]
    assert sorted(p.name for p in corpus.root.iterdir()) == ["manifest.json", "test.txt", "train.txt", "val.txt"]


def test_a_text_without_line_breaks_is_cut_where_the_blocks_end(tmp_path: Path) -> None:
    text = "abcdefghij" * 200 + "\n"
    corpus = prepare_text(text, "one-line", tmp_path / "data")
    assert corpus.text("train") + corpus.text("test") + corpus.text("val") == text
    assert all(corpus.manifest["chars"][s] > 0 for s in SPLITS)


def test_a_text_in_memory_makes_the_same_corpus_as_its_file(tmp_path: Path) -> None:
    text = poem(100).replace("\n", "\r\n")  # normalised alike
    (tmp_path / "t.txt").write_bytes(text.encode())
    from_file = prepare_path(tmp_path / "t.txt", "t", tmp_path / "a")
    in_memory = prepare_text(text, "t", tmp_path / "b")
    for split in SPLITS:
        assert from_file.text(split) == in_memory.text(split)
    assert from_file.manifest["sha256"] == in_memory.manifest["sha256"]
    assert from_file.manifest["vocab"] == in_memory.manifest["vocab"]


def test_a_directory_is_split_by_file_with_the_fixed_hash(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for i in range(60):
        path = root / f"pkg{i % 3}" / f"mod{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def f{i}(x):\n    return x + {i}\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    corpus = prepare_path(root, "src", tmp_path / "data")
    m = corpus.manifest
    assert m["split"] == "files" and m["skipped"] == ["logo.png"]
    listed = sorted(d for s in SPLITS for d in m["works"][s])
    assert listed == sorted(f"pkg{i % 3}/mod{i}.py" for i in range(60))  # each file once, hidden ones not
    for split in SPLITS:
        assert m["works"][split], split
        assert all(split_by_hash(doc) == split for doc in m["works"][split])
        for doc in m["works"][split]:
            assert normalise((root / doc).read_text()) in corpus.text(split)


def test_a_directory_of_few_files_is_split_in_blocks(tmp_path: Path) -> None:
    root = tmp_path / "book"
    root.mkdir()
    for name in ("a.txt", "b.txt"):
        (root / name).write_text(poem(20))
    corpus = prepare_path(root, "book", tmp_path / "data")
    assert corpus.manifest["split"] == "blocks"
    joined = corpus.text("train") + corpus.text("test") + corpus.text("val")
    assert joined == poem(20) + "\n" + poem(20)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"  \n\n\t\n", "is empty"),
        (b"abc\0def" * 500, "binary"),
        ("caf\xe9\n".encode("latin-1") * 500, "not UTF-8"),
        (b"too short\n" * 10, f"at least {MIN_TEXT_CHARS:,}"),
    ],
    ids=["empty", "blank", "nul-bytes", "latin-1", "too-small"],
)
def test_bad_input_is_refused_with_a_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "in.txt").write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        prepare_path(tmp_path / "in.txt", "bad", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_bad_texts_in_memory_are_refused(tmp_path: Path) -> None:
    for text, message in [("", "is empty"), ("x\0" * 1000, "binary"), ("short\n", "at least")]:
        with pytest.raises(CorpusError, match=message):
            prepare_text(text, "bad", tmp_path / "data")


def test_a_directory_without_text_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.bin").write_bytes(b"\0\1\2")
    with pytest.raises(CorpusError, match="only binary or empty files"):
        prepare_path(tmp_path / "bin", "bin", tmp_path / "data")
    with pytest.raises(CorpusError, match="neither a file nor a directory"):
        prepare_path(tmp_path / "missing", "m", tmp_path / "data")


@pytest.mark.parametrize("name", ["", "../up", "a/b", ".hidden", "x" * 65, "sp ace"])
def test_a_corpus_name_is_never_a_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="corpus name"):
        prepare_text(poem(100), name, tmp_path / "data")


# -- sized training defaults ------------------------------------------------------------------------


def test_a_shakespeare_sized_corpus_gets_the_trainers_own_defaults() -> None:
    sized = sized_defaults(4_621_119, 84, "lstm")
    defaults = TrainConfig()
    assert sized == {k: getattr(defaults, k) for k in sized}


def test_a_smaller_corpus_gets_a_model_no_larger() -> None:
    sizes = [sized_defaults(n, 80, "lstm") for n in (1_000, 30_000, 300_000, 3_000_000)]
    hidden = [s["hidden_size"] for s in sizes]
    assert hidden == sorted(hidden) and hidden[0] == 32 and hidden[-1] > hidden[0]
    for n, s in zip((1_000, 30_000, 300_000, 3_000_000), sizes, strict=True):
        if s["hidden_size"] > 32:  # one parameter per training character at most
            assert parameters("lstm", 80, s["hidden_size"], 2, s["embedding_size"]) <= n


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_the_parameter_count_is_the_models(arch: str) -> None:
    model = CharRNN(ModelConfig(arch=arch, vocab_size=70, embedding_size=32, hidden_size=48, num_layers=2))
    assert parameters(arch, 70, 48, 2, 32) == model.num_parameters


@pytest.mark.parametrize("chars", [MIN_TEXT_CHARS * 9 // 10, 5_000, 77_777, 1_000_000])
def test_the_sized_batches_fit_the_training_split(chars: int) -> None:
    s = sized_defaults(chars, 60)
    StreamBatches(torch.zeros(chars, dtype=torch.long), s["batch_size"], s["seq_len"])  # raises if too short


def test_data_and_train_commands_on_a_text_of_ones_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "poem.txt").write_text(poem(60))
    cli.main(["data", "--text", str(tmp_path / "poem.txt"), "--name", "poem", "--out", str(tmp_path / "data")])
    assert "wrote" in capsys.readouterr().out
    args = ["train", "--data", str(tmp_path / "data"), "--models-dir", str(tmp_path / "models")]
    args += ["--run-dir", str(tmp_path / "run"), "--max-steps", "3", "--quiet", "--threads", "1"]
    cli.main(args)
    ckpt = load_checkpoint(tmp_path / "models" / "poem-lstm")  # named after the corpus
    assert ckpt.model.config.hidden_size == 32  # a small corpus, a small model
    meta = json.loads((tmp_path / "models" / "poem-lstm" / "meta.json").read_text())
    assert meta["corpus"]["name"] == "poem" and "val_nats_per_char" in meta["metrics"]


def test_the_data_command_says_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"\0" * 2000)
    with pytest.raises(SystemExit, match="binary"):
        cli.main(["data", "--text", str(tmp_path / "x.bin"), "--name", "x", "--out", str(tmp_path / "d")])
    with pytest.raises(SystemExit, match="needs --name"):
        cli.main(["data", "--text", str(tmp_path / "x.bin")])


@pytest.mark.parametrize("seed", range(20))
def test_blocks_cover_the_text_in_order_at_line_starts(seed: int) -> None:
    rng = random.Random(seed)
    lines = [rng.choice(["", "x" * rng.randint(1, 300)]) for _ in range(rng.randint(1, 200))]
    text = "\n".join(lines) + "\n" + "y" * MIN_TEXT_CHARS + "\n"
    texts, works = split_blocks(text, "t")
    assert texts["train"] + texts["test"] + texts["val"] == text
    assert all(texts[s] for s in SPLITS)
    if "\n" in text[: -MIN_TEXT_CHARS - 1]:  # where a newline is in reach, the cuts come right after one
        assert texts["train"].endswith("\n") or len(texts["train"]) >= len(text) * 0.85
    for split in SPLITS:
        assert works[split][0].startswith("t, lines ")
