"""The trainer: learning, checkpoints, exact resume, the LR schedule, stream batches and `rnnserve train`."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from app.checkpoint import load_checkpoint
from app.nn import state_parts
from app.training.corpus import build
from app.training.evaluate import stream_loss, text_loss
from app.training.trainer import StreamBatches, TrainConfig, Trainer, bf16_supported, lr_at, train_config_from
from app.vocab import Vocab


def _cfg(**overrides: object) -> TrainConfig:
    fields: dict[str, object] = {
        "arch": "gru",
        "embedding_size": 8,
        "hidden_size": 16,
        "num_layers": 1,
        "dropout": 0.0,
        "batch_size": 4,
        "seq_len": 16,
        "lr": 1e-2,
        "warmup_steps": 5,
        "max_steps": 20,
        "eval_every": 10,
        "threads": 1,
        **overrides,
    }
    return TrainConfig(**fields)  # type: ignore[arg-type]


def _trainer(cfg: TrainConfig, vocab: Vocab, text: str, root: Path) -> Trainer:
    return Trainer(cfg, vocab, text * 2, text, root / "out", root / "run", corpus={"name": "tiny"})


class _Killed(Exception):
    pass


def _train_until_first_save(trainer: Trainer) -> None:
    """Train, and stop the way a killed process would: right after the first saved state."""
    save_state = trainer.save_state

    def save_then_die() -> None:
        save_state()
        raise _Killed

    trainer.save_state = save_then_die  # type: ignore[method-assign]
    with pytest.raises(_Killed):
        trainer.train(progress=False)


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return trainer.model.state_dict()


# -- learning and checkpoints -----------------------------------------------------------------


def test_training_lowers_validation_loss_and_writes_a_loadable_checkpoint(
    tmp_path: Path, vocab: Vocab, tiny_text: str
) -> None:
    cfg = _cfg(arch="lstm", hidden_size=32, max_steps=100, eval_every=50)
    trainer = Trainer(cfg, vocab, tiny_text * 4, tiny_text, tmp_path / "out", tmp_path / "run", {"name": "tiny"})
    before = stream_loss(trainer.model, trainer.val_ids).nats_per_char
    best = trainer.train(progress=False)
    after = stream_loss(trainer.model, trainer.val_ids).nats_per_char

    assert trainer.step == 100
    assert after < before - 1.0, (before, after)
    assert best == pytest.approx(min(p["val"] for p in trainer.curve), abs=1e-4)
    assert [p["step"] for p in trainer.curve] == [50, 100]

    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt.vocab.chars == vocab.chars
    assert ckpt.model.config == cfg.model_config(len(vocab))
    assert ckpt.meta["corpus"] == {"name": "tiny"}
    assert ckpt.meta["training"]["steps"] in (50, 100)
    assert ckpt.meta["training"]["parameters"] == trainer.model.num_parameters
    assert ckpt.meta["training"]["hardware"] == "1-thread CPU"
    assert ckpt.meta["metrics"]["val_nats_per_char_16_streams"] == pytest.approx(best, abs=1e-4)
    assert ckpt.meta["curve"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["state.json", "state.safetensors"]


needs_bf16 = pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no bfloat16 kernels")


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
@needs_bf16
def test_bf16_training_learns_and_carries_an_fp32_state(
    tmp_path: Path, vocab: Vocab, tiny_text: str, arch: str
) -> None:
    cfg = _cfg(arch=arch, hidden_size=32, max_steps=60, eval_every=60, precision="bf16")
    trainer = _trainer(cfg, vocab, tiny_text, tmp_path)
    before = trainer.evaluate()
    trainer.train(progress=False)

    assert trainer.evaluate() < before - 0.5
    assert trainer.carry is not None
    assert {t.dtype for t in state_parts(trainer.carry)} == {torch.float32}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


@needs_bf16
def test_bf16_resume_is_exact(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    _resume_matches_one_run(tmp_path, vocab, tiny_text, _cfg(arch="lstm", precision="bf16"), half=7)


def test_precision_is_checked() -> None:
    with pytest.raises(ValueError, match="precision must be one of \\['bf16', 'fp32'\\], got 'fp16'"):
        _cfg(precision="fp16")


@pytest.mark.skipif(bf16_supported(torch.device("cpu")), reason="this CPU has bfloat16 kernels")
def test_bf16_is_refused_where_the_cpu_lacks_it(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    with pytest.raises(ValueError, match=r"precision bf16 needs bfloat16 kernels, which cpu \(\w+\) lacks: use fp32"):
        _trainer(_cfg(precision="bf16"), vocab, tiny_text, tmp_path)


def test_device_is_checked() -> None:
    with pytest.raises(ValueError, match="device must be one of \\['cpu', 'cuda'\\], got 'tpu'"):
        _cfg(device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_is_refused_without_a_gpu(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    with pytest.raises(ValueError, match="device cuda needs a GPU that torch can use, and there is none here"):
        _trainer(_cfg(device="cuda"), vocab, tiny_text, tmp_path)


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_weight_drop_masks_the_recurrent_weights_in_training_only(
    tmp_path: Path, vocab: Vocab, tiny_text: str, arch: str
) -> None:
    trainer = _trainer(_cfg(arch=arch, weight_drop=0.5), vocab, tiny_text, tmp_path)
    x, _ = trainer.batches.window(0)
    plain = trainer.model(x)[0]
    dropped = trainer.forward(x)[0]
    assert not torch.allclose(dropped, plain)  # training: a different network
    trainer.forward(x)[0].sum().backward()
    for name, w in trainer.model.named_parameters():  # the masked weights still learn
        assert w.grad is not None and w.grad.abs().sum() > 0, name
    trainer.model.eval()
    assert torch.equal(trainer.forward(x)[0], trainer.model(x)[0])  # evaluation: the whole weights
    assert {n for n, _ in trainer.model.named_parameters()} >= {"rnn.weight_hh_l0"}


def test_weight_drop_training_learns(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    trainer = _trainer(_cfg(arch="lstm", hidden_size=32, max_steps=60, eval_every=60, weight_drop=0.3), vocab,
                       tiny_text, tmp_path)  # fmt: skip
    before = trainer.evaluate()
    trainer.train(progress=False)
    assert trainer.evaluate() < before - 0.5


def test_weight_drop_resume_is_exact(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    # the masks come from the saved generator: a resumed run draws the ones the whole run would
    _resume_matches_one_run(tmp_path, vocab, tiny_text, _cfg(arch="lstm", weight_drop=0.3), half=7)


def test_weight_drop_is_checked() -> None:
    with pytest.raises(ValueError, match=r"weight_drop must be in \[0, 1\), got 1.0"):
        _cfg(weight_drop=1.0)


def test_best_checkpoint_is_not_overwritten_by_a_worse_one(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    trainer = _trainer(_cfg(max_steps=4, eval_every=2), vocab, tiny_text, tmp_path)
    trainer.evaluate = iter([2.0, 3.0]).__next__  # type: ignore[method-assign]
    assert trainer.train(progress=False) == 2.0
    ckpt = load_checkpoint(tmp_path / "out")
    assert ckpt.meta["training"]["steps"] == 2
    assert ckpt.meta["metrics"]["val_nats_per_char_16_streams"] == 2.0


# -- resume -----------------------------------------------------------------------------------


def _windows(vocab: Vocab, text: str, cfg: TrainConfig) -> int:
    ids = torch.tensor(vocab.encode(text * 2), dtype=torch.long)
    return StreamBatches(ids, cfg.batch_size, cfg.seq_len).windows


def _resume_matches_one_run(tmp_path: Path, vocab: Vocab, text: str, cfg: TrainConfig, half: int) -> None:
    cfg = replace(cfg, max_steps=2 * half, eval_every=half)
    straight = _trainer(cfg, vocab, text, tmp_path / "straight")
    straight.train(progress=False)

    _train_until_first_save(_trainer(cfg, vocab, text, tmp_path / "resumed"))
    resumed = _trainer(cfg, vocab, text, tmp_path / "resumed")
    assert resumed.load_state()
    assert resumed.step == half
    resumed.train(progress=False)

    assert resumed.step == straight.step == 2 * half
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [p["val"] for p in resumed.curve] == [p["val"] for p in straight.curve]


@pytest.mark.parametrize(("arch", "dropout", "layers"), [("lstm", 0.0, 1), ("gru", 0.3, 2)])
def test_resume_at_an_epoch_boundary_is_exact(
    tmp_path: Path, vocab: Vocab, tiny_text: str, arch: str, dropout: float, layers: int
) -> None:
    cfg = _cfg(arch=arch, dropout=dropout, num_layers=layers)
    _resume_matches_one_run(tmp_path, vocab, tiny_text, cfg, half=_windows(vocab, tiny_text, cfg))


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_resume_mid_epoch_is_exact(tmp_path: Path, vocab: Vocab, tiny_text: str, arch: str) -> None:
    cfg = _cfg(arch=arch)
    half = _windows(vocab, tiny_text, cfg) + 3
    _resume_matches_one_run(tmp_path, vocab, tiny_text, cfg, half=half)


def test_state_round_trips_model_and_optimizer(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    cfg = _cfg(max_steps=6, eval_every=3)
    trainer = _trainer(cfg, vocab, tiny_text, tmp_path)
    trainer.train(progress=False)
    fresh = _trainer(cfg, vocab, tiny_text, tmp_path)
    assert fresh.load_state()
    assert (fresh.step, fresh.best_val, fresh.curve) == (trainer.step, trainer.best_val, trainer.curve)
    for key, tensor in _weights(trainer).items():
        assert torch.equal(_weights(fresh)[key], tensor), key
    saved, loaded = trainer.optim.state_dict(), fresh.optim.state_dict()
    assert saved["state"].keys() == loaded["state"].keys()
    for pid, st in saved["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(loaded["state"][pid][k]), torch.as_tensor(v)), (pid, k)
    assert saved["param_groups"][0]["lr"] == loaded["param_groups"][0]["lr"]


def test_load_state_without_a_saved_run(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    assert not _trainer(_cfg(), vocab, tiny_text, tmp_path).load_state()


def test_load_state_refuses_another_vocabulary(tmp_path: Path, vocab: Vocab, tiny_text: str) -> None:
    _trainer(_cfg(max_steps=2, eval_every=2), vocab, tiny_text, tmp_path).train(progress=False)
    other = Vocab(vocab.chars[::-1])
    with pytest.raises(ValueError, match="different vocabulary"):
        _trainer(_cfg(), other, tiny_text, tmp_path).load_state()


# -- schedule, batches, config -----------------------------------------------------------------


def test_lr_warmup_is_linear_and_reaches_lr() -> None:
    cfg = _cfg(lr=1e-2, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    warm = [lr_at(s, cfg) for s in range(10)]
    assert warm[0] == pytest.approx(1e-3)
    steps = [b - a for a, b in itertools.pairwise(warm)]
    assert steps == pytest.approx([1e-3] * 9)
    assert warm[-1] == pytest.approx(1e-2)
    assert lr_at(10, cfg) == pytest.approx(1e-2)


def test_lr_cosine_decays_to_min_ratio() -> None:
    cfg = _cfg(lr=1e-2, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert lr_at(60, cfg) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))  # half way: the mean
    assert lr_at(110, cfg) == pytest.approx(1e-3)
    assert lr_at(500, cfg) == pytest.approx(1e-3)  # past the end it stays at the floor
    # with a time budget the decay ends by the budget's end too, whichever comes first
    timed = TrainConfig(lr=1e-2, warmup_steps=10, max_steps=110, min_lr_ratio=0.1, time_budget_s=100.0)
    assert lr_at(60, timed, elapsed=10.0) == pytest.approx(lr_at(60, cfg))
    assert lr_at(20, timed, elapsed=100.0) == pytest.approx(1e-3)
    assert lr_at(20, timed, elapsed=50.0) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))


def test_lr_without_warmup() -> None:
    cfg = _cfg(lr=1e-2, warmup_steps=0, max_steps=10, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == pytest.approx(1e-2)
    assert lr_at(10, cfg) == pytest.approx(0.0)


def test_stream_batches_are_contiguous_streams() -> None:
    ids = torch.arange(203)
    batches = StreamBatches(ids, batch_size=4, seq_len=7)
    n = 202 // 4
    assert batches.windows == n // 7
    for b in range(4):
        stream_x = torch.cat([batches.window(i)[0][:, b] for i in range(batches.windows)])
        stream_y = torch.cat([batches.window(i)[1][:, b] for i in range(batches.windows)])
        start = b * n
        assert torch.equal(stream_x, torch.arange(start, start + 7 * batches.windows))
        assert torch.equal(stream_y, stream_x + 1)  # y is the next character
    for i in range(batches.windows):
        x, y = batches.window(i)
        assert x.shape == y.shape == (7, 4)
        assert torch.equal(x[1:], y[:-1])  # x[t+1] == y[t] within a window
        if i + 1 < batches.windows:
            assert torch.equal(batches.window(i + 1)[0][0], y[-1])  # window i+1 continues window i


def test_stream_batches_refuse_a_short_text() -> None:
    with pytest.raises(ValueError, match="text too short"):
        StreamBatches(torch.arange(60), batch_size=4, seq_len=16)


def test_train_config_from_ignores_other_keys_and_none() -> None:
    cfg = train_config_from({"arch": "rnn", "lr": None, "max_steps": 7, "name": "x", "quiet": True})
    assert cfg == replace(TrainConfig(), arch="rnn", max_steps=7)


# -- `rnnserve train` -------------------------------------------------------------------------


def _tiny_corpus(root: Path, text: str) -> Path:
    lines = text.splitlines(keepends=True)
    works = {
        "hamlet": text,
        "coriolanus": text[::-1].strip() + "\n",
        "lear": "".join(sorted(lines)),
        "julius_caesar": "".join(lines[:6]),
        "twelfth_night": "".join(lines[6:12]),
        "macbeth": "".join(lines[12:18]),
        "tempest": "".join(lines[18:]),
    }
    build(works, root)
    return root


def test_cli_train_writes_a_checkpoint_with_metrics(
    tmp_path: Path, tiny_text: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import main

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory's runs/ or models/
    data = _tiny_corpus(tmp_path / "data", tiny_text)
    argv = [
        "train", "--arch", "gru", "--name", "tiny-gru", "--data", str(data),
        "--models-dir", str(tmp_path / "models"), "--run-dir", str(tmp_path / "run"),
        "--embedding-size", "8", "--hidden-size", "16", "--num-layers", "1", "--dropout", "0",
        "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2", "--warmup-steps", "5",
        "--max-steps", "20", "--eval-every", "10", "--quiet", "--threads", "1",
    ]  # fmt: skip
    main(argv)
    out = capsys.readouterr().out
    assert "tiny-gru: gru 1x16" in out

    model_dir = tmp_path / "models" / "tiny-gru"
    meta = json.loads((model_dir / "meta.json").read_text())
    metrics = meta["metrics"]
    for split in ("val", "test"):
        nats = metrics[f"{split}_nats_per_char"]
        assert 0 < nats < math.log(len(json.loads((data / "manifest.json").read_text())["vocab"])) + 0.5
        assert metrics[f"{split}_bits_per_char"] == pytest.approx(nats / math.log(2), abs=1e-3)
    assert [p["step"] for p in meta["curve"]] == [10, 20]
    assert meta["corpus"]["works"]["test"] == ["macbeth", "tempest"]
    assert not (tmp_path / "runs").exists()

    # the reported metric is one stream over the whole split, after BOS, with the saved weights
    ckpt = load_checkpoint(model_dir)
    val = text_loss(ckpt.model, ckpt.vocab, (data / "val.txt").read_text(encoding="utf-8"))
    assert metrics["val_nats_per_char"] == pytest.approx(val.nats_per_char, abs=1e-4)

    # `rnnserve eval` reproduces the recorded test figure
    main(["eval", "--model", "tiny-gru", "--models-dir", str(tmp_path / "models"), "--data", str(data)])
    assert f"{metrics['test_nats_per_char']:.4f} nats/char" in capsys.readouterr().out
    # and through the decoding step on 8-bit weights, what RNNSERVE_WEIGHTS=int8 serves: about the same
    main(["eval", "--model", "tiny-gru", "--models-dir", str(tmp_path / "models"), "--data", str(data),
          "--weights", "int8"])  # fmt: skip
    out = capsys.readouterr().out
    assert "tiny-gru, int8 weights on test split" in out
    int8 = float(re.search(r"([0-9.]+) nats/char", out)[1])  # type: ignore[index]
    assert int8 == pytest.approx(metrics["test_nats_per_char"], abs=0.02)

    # --resume continues the run from its saved state
    main([*argv[: argv.index("--max-steps")], "--max-steps", "30", "--eval-every", "10", "--quiet", "--resume"])
    assert "resumed" in capsys.readouterr().out
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 30
    assert [p["step"] for p in state["curve"]] == [10, 20, 30]

    # --init-from starts a new run from the shipped weights, with a fresh optimizer
    init = [*argv, "--name", "tiny-gru-2", "--run-dir", str(tmp_path / "run2"), "--init-from", str(model_dir)]
    main([*init, "--max-steps", "1", "--lr", "0", "--eval-every", "1"])  # a step that changes nothing
    assert f"starting from the weights of {model_dir}" in capsys.readouterr().out
    again = load_checkpoint(tmp_path / "models" / "tiny-gru-2")
    now = load_checkpoint(model_dir)
    pairs = zip(again.model.state_dict().values(), now.model.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # the continued checkpoint reports the whole history: earlier steps, time and curve included
    before, after = now.meta["training"], again.meta["training"]
    assert after["steps"] == before["steps"] + 1
    assert after["chars_seen"] == before["chars_seen"] + 4 * 16
    assert after["train_seconds"] >= before["train_seconds"]
    assert after["continued_from"]["steps"] == before["steps"]
    assert [p["step"] for p in again.meta["curve"]] == [p["step"] for p in now.meta["curve"]] + [before["steps"] + 1]
