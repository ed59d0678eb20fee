"""The checkpoint format: bit-exact round trip, sha256 verification, and never unpickling."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.checkpoint import (
    CONFIG,
    META,
    VOCAB,
    WEIGHTS,
    check_name,
    load_checkpoint,
    publish,
    save_checkpoint,
    sha256_file,
    update_meta,
    write_atomically,
)
from app.errors import CheckpointError
from app.nn import CharRNN
from app.vocab import Vocab


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_round_trip_is_bit_exact(arch: str, tmp_path: Path, tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model(arch, dropout=0.1)
    meta = {"corpus": {"name": "tiny"}, "metrics": {"val_nats_per_char": 1.5}, "curve": [{"step": 1}]}
    digest = save_checkpoint(tmp_path / "m", model, vocab, meta)

    ckpt = load_checkpoint(tmp_path / "m")
    assert ckpt.name == "m"
    assert ckpt.model.config == model.config
    assert ckpt.vocab.chars == vocab.chars
    assert ckpt.meta == {**meta, "sha256": digest}
    assert ckpt.sha256 == digest == sha256_file(tmp_path / "m" / WEIGHTS)
    assert not ckpt.model.training
    saved, loaded = model.state_dict(), ckpt.model.state_dict()
    assert saved.keys() == loaded.keys()
    for key, tensor in saved.items():
        assert loaded[key].dtype == tensor.dtype
        assert torch.equal(loaded[key], tensor), key


def test_save_leaves_no_temporary_files(checkpoint_dir: Path) -> None:
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == sorted([WEIGHTS, CONFIG, VOCAB, META])


def test_loading_never_unpickles(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_checkpoint must never unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    ckpt = load_checkpoint(checkpoint_dir)
    assert ckpt.model.config.arch == "lstm"


def test_pickle_only_directory_is_refused(tmp_path: Path, tiny_model: Callable[..., CharRNN]) -> None:
    directory = tmp_path / "pickled"
    directory.mkdir()
    torch.save(tiny_model("gru").state_dict(), directory / "model.pt")
    with pytest.raises(CheckpointError, match="safetensors") as info:
        load_checkpoint(directory)
    assert "model.pt" in info.value.message


def test_pickle_beside_good_weights_is_ignored(checkpoint_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save({"boom": torch.zeros(1)}, checkpoint_dir / "model.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    assert load_checkpoint(checkpoint_dir).model.config.arch == "lstm"


def test_truncated_weights_fail_the_sha256_check(checkpoint_dir: Path) -> None:
    weights = checkpoint_dir / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(checkpoint_dir)


@pytest.mark.parametrize("keep", [4, 64, -100])
def test_truncated_weights_with_matching_sha256_are_not_valid_safetensors(checkpoint_dir: Path, keep: int) -> None:
    weights = checkpoint_dir / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:keep])
    update_meta(checkpoint_dir, sha256=sha256_file(weights))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_checkpoint(checkpoint_dir)


def test_flipped_byte_fails_the_sha256_check(checkpoint_dir: Path) -> None:
    weights = checkpoint_dir / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # inside the last tensor's data: still a parseable file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as info:
        load_checkpoint(checkpoint_dir)
    assert sha256_file(weights) in info.value.message


def test_missing_sha256_in_meta_is_refused(checkpoint_dir: Path) -> None:
    meta = json.loads((checkpoint_dir / META).read_text())
    del meta["sha256"]
    (checkpoint_dir / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(checkpoint_dir)


@pytest.mark.parametrize("name", [CONFIG, VOCAB, META])
def test_invalid_json_is_refused(checkpoint_dir: Path, name: str) -> None:
    (checkpoint_dir / name).write_text('{"arch": "lstm",')
    with pytest.raises(CheckpointError, match=f"{name} is not valid JSON"):
        load_checkpoint(checkpoint_dir)


@pytest.mark.parametrize("name", [CONFIG, VOCAB, META])
def test_missing_json_is_refused(checkpoint_dir: Path, name: str) -> None:
    (checkpoint_dir / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing {name}"):
        load_checkpoint(checkpoint_dir)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        (CONFIG, {"arch": "transformer"}),
        (CONFIG, {"arch": "lstm", "colour": "blue"}),
        (CONFIG, ["lstm"]),
        (VOCAB, {"letters": "abc"}),
        (VOCAB, {"chars": "aab"}),
    ],
)
def test_invalid_config_or_vocab_is_refused(checkpoint_dir: Path, name: str, content: object) -> None:
    (checkpoint_dir / name).write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match="invalid config or vocab"):
        load_checkpoint(checkpoint_dir)


def test_vocab_size_mismatch_is_refused(checkpoint_dir: Path) -> None:
    (checkpoint_dir / VOCAB).write_text(json.dumps({"chars": "abc"}))
    with pytest.raises(CheckpointError, match="vocab has 3 chars"):
        load_checkpoint(checkpoint_dir)


def test_weights_of_another_shape_are_refused(checkpoint_dir: Path) -> None:
    config = json.loads((checkpoint_dir / CONFIG).read_text())
    (checkpoint_dir / CONFIG).write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="weights do not match config"):
        load_checkpoint(checkpoint_dir)


def test_update_meta_merges_and_keeps_sha256(checkpoint_dir: Path) -> None:
    before = json.loads((checkpoint_dir / META).read_text())
    update_meta(checkpoint_dir, metrics={"val_nats_per_char": 1.25}, note="x")
    after = json.loads((checkpoint_dir / META).read_text())
    assert after["sha256"] == before["sha256"] == sha256_file(checkpoint_dir / WEIGHTS)
    assert after["metrics"] == {"val_nats_per_char": 1.25}
    assert after["note"] == "x"
    assert after["corpus"] == before["corpus"]
    assert load_checkpoint(checkpoint_dir).meta["metrics"] == {"val_nats_per_char": 1.25}
    assert not list(checkpoint_dir.glob("*.tmp"))


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("fields", [{"hidden_size": 16.0}, {"num_layers": 1.5}])
def test_non_integer_sizes_in_config_are_refused(checkpoint_dir: Path, fields: dict[str, object]) -> None:
    config = json.loads((checkpoint_dir / CONFIG).read_text())
    (checkpoint_dir / CONFIG).write_text(json.dumps({**config, **fields}))
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint_dir)


# -- publishing: a reader never sees a half-written checkpoint -------------------------------------


def test_saving_over_a_checkpoint_swaps_the_whole_directory(
    checkpoint_dir: Path, tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    (checkpoint_dir / "stale.txt").write_text("from the old version")
    digest = save_checkpoint(checkpoint_dir, tiny_model("gru", seed=1), vocab, {"metrics": {}})
    assert load_checkpoint(checkpoint_dir).sha256 == digest
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == sorted([WEIGHTS, CONFIG, VOCAB, META])
    assert [p.name for p in checkpoint_dir.parent.iterdir()] == [checkpoint_dir.name]  # no temporary left


def test_a_failed_write_leaves_the_published_checkpoint_as_it_was(checkpoint_dir: Path) -> None:
    before = {p.name: p.read_bytes() for p in checkpoint_dir.iterdir()}
    with pytest.raises(RuntimeError, match="interrupted"), write_atomically(checkpoint_dir) as tmp:
        assert tmp.parent == checkpoint_dir.parent and tmp.name.startswith(".")  # hidden from the registry
        (tmp / WEIGHTS).write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert {p.name: p.read_bytes() for p in checkpoint_dir.iterdir()} == before
    assert [p.name for p in checkpoint_dir.parent.iterdir()] == [checkpoint_dir.name]


def test_publish_puts_a_directory_in_place_new_or_over_another(tmp_path: Path) -> None:
    for version in ("one", "two"):
        staged = tmp_path / f".staged-{version}"
        staged.mkdir()
        (staged / "v").write_text(version)
        publish(staged, tmp_path / "dest")
        assert (tmp_path / "dest" / "v").read_text() == version
        assert not staged.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]


@pytest.mark.parametrize("name", ["shakespeare-lstm", "a", "v1.2_x"])
def test_check_name_accepts_directory_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden", "-flag", "a b", "x" * 65, "é"])
def test_check_name_refuses_paths_and_odd_names(name: str) -> None:
    with pytest.raises(ValueError, match="name must be"):
        check_name(name)
