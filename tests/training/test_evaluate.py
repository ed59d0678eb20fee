"""stream_loss: the streamed, stateful next-char loss."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from app.nn import CharRNN, FusedStep
from app.training.evaluate import Loss, step_loss, stream_loss, text_loss
from app.vocab import Vocab


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_untrained_model_scores_about_log_vocab(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (500,), generator=torch.Generator().manual_seed(1))
    loss = stream_loss(model, ids)
    assert loss.chars == 499
    assert abs(loss.nats_per_char - math.log(V)) < 0.3


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
@torch.no_grad()
def test_one_stream_equals_a_manual_computation(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (300,), generator=torch.Generator().manual_seed(2))
    logits, _ = model(ids[:-1].view(-1, 1))  # (T, 1, V)
    expected = F.cross_entropy(logits[:, 0], ids[1:]).item()
    loss = stream_loss(model, ids, streams=1)
    assert loss.chars == 299
    assert loss.nats_per_char == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_a_decoding_step_gives_the_one_stream_loss(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (301,), generator=torch.Generator().manual_seed(5))
    whole = stream_loss(model, ids)
    stepped = step_loss(FusedStep(model), model, ids, chunk=64)  # chunks that do not divide the text
    assert stepped.chars == whole.chars == 300
    assert stepped.nats_per_char == pytest.approx(whole.nats_per_char, abs=1e-5)


@pytest.mark.parametrize("streams", [1, 3])
def test_chunk_size_does_not_change_the_result(streams: int, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model("lstm")
    ids = torch.randint(0, model.config.vocab_size, (301,), generator=torch.Generator().manual_seed(3))
    a = stream_loss(model, ids, streams=streams, chunk=7)
    b = stream_loss(model, ids, streams=streams, chunk=1000)
    c = stream_loss(model, ids, streams=streams, chunk=1)
    usable = (len(ids) // streams) * streams
    assert a.chars == b.chars == c.chars == usable - streams
    assert a.nats_per_char == pytest.approx(b.nats_per_char, abs=1e-5)
    assert c.nats_per_char == pytest.approx(b.nats_per_char, abs=1e-5)


@torch.no_grad()
def test_several_streams_are_independent_pieces(tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model("gru")
    ids = torch.randint(0, model.config.vocab_size, (302,), generator=torch.Generator().manual_seed(4))
    pieces = ids[:300].view(3, 100)  # the two trailing characters are dropped
    total = 0.0
    for piece in pieces:
        logits, _ = model(piece[:-1].view(-1, 1))
        total += F.cross_entropy(logits[:, 0], piece[1:], reduction="sum").item()
    loss = stream_loss(model, ids, streams=3, chunk=10)
    assert loss.chars == 3 * 99
    assert loss.nats_per_char == pytest.approx(total / (3 * 99), abs=1e-5)


def test_training_mode_is_restored_and_dropout_is_off(tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model("lstm", dropout=0.5).train()
    ids = torch.randint(0, model.config.vocab_size, (100,), generator=torch.Generator().manual_seed(5))
    a = stream_loss(model, ids)
    b = stream_loss(model, ids)
    assert model.training
    assert a == b  # evaluated in eval mode: no dropout noise


def test_loss_units() -> None:
    loss = Loss(chars=10, nats_per_char=math.log(4))
    assert loss.bits_per_char == pytest.approx(2.0)
    assert loss.perplexity == pytest.approx(4.0)


@torch.no_grad()
def test_text_loss_scores_every_character_after_bos(
    tiny_model: Callable[..., CharRNN], vocab: Vocab, tiny_text: str
) -> None:
    model = tiny_model("gru")
    text = tiny_text[:120]
    ids = torch.tensor([vocab.bos, *vocab.encode(text)])
    logits, _ = model(ids[:-1].view(-1, 1))
    expected = F.cross_entropy(logits[:, 0], ids[1:]).item()
    loss = text_loss(model, vocab, text)
    assert vocab.chars[vocab.bos] == "\n"
    assert loss.chars == len(text)
    assert loss.nats_per_char == pytest.approx(expected, abs=1e-5)


def test_text_loss_skips_unknown_characters(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model("rnn")
    clean = text_loss(model, vocab, "Speak, speak.\n")
    noisy = text_loss(model, vocab, "Sp\u00e9ak, sp\u00eaak.\n")  # accents are outside the vocab
    assert clean.chars == 14
    assert noisy == text_loss(model, vocab, "Spak, spak.\n")
    assert noisy.chars == 12
