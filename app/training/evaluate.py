"""Streaming, stateful evaluation: nats/char and bits/char over a whole text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from app.nn import CharRNN, Step
from app.vocab import Vocab

if TYPE_CHECKING:
    from app.training.corpus import Corpus


@dataclass(frozen=True)
class Loss:
    chars: int
    nats_per_char: float

    @property
    def bits_per_char(self) -> float:
        return self.nats_per_char / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_char)


@torch.no_grad()
def stream_loss(model: CharRNN, ids: torch.Tensor, streams: int = 1, chunk: int = 1024) -> Loss:
    """Mean next-char loss over 1-D `ids`, the state carried across chunks.

    streams=1 is the reported metric: one stream from the first character to the last. Training
    uses streams>1 (the text cut into that many contiguous pieces, run as a batch) for speed.
    Each stream's first character has no prediction, so `chars` is len(ids) - streams.
    """
    was_training = model.training
    model.eval()
    n = (len(ids) // streams) * streams
    x = ids[:n].view(streams, -1).t().contiguous()  # (N, S)
    total, count, state = 0.0, 0, None
    for start in range(0, x.shape[0] - 1, chunk):
        inp = x[start : start + chunk]
        tgt = x[start + 1 : start + chunk + 1]
        inp = inp[: tgt.shape[0]]
        logits, state = model(inp, state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum").item()
        count += tgt.numel()
    model.train(was_training)
    return Loss(chars=count, nats_per_char=total / max(count, 1))


@torch.no_grad()
def step_loss(step: Step, model: CharRNN, ids: torch.Tensor, chunk: int = 1024) -> Loss:
    """stream_loss's one-stream metric through a decoding step, a character at a time: the loss of
    what a server decoding with that step serves (for example on quantized weights)."""
    total, state = 0.0, model.zero_state(1)
    for start in range(0, len(ids) - 1, chunk):
        logits = []
        for i in range(start, min(start + chunk, len(ids) - 1)):
            out, state = step(ids[i : i + 1], state)  # (1, V)
            logits.append(out)
        tgt = ids[start + 1 : start + 1 + len(logits)]
        total += F.cross_entropy(torch.cat(logits), tgt, reduction="sum").item()
    count = len(ids) - 1
    return Loss(chars=count, nats_per_char=total / max(count, 1))


def text_loss(model: CharRNN, vocab: Vocab, text: str, step: Step | None = None) -> Loss:
    """Loss of every character of `text` (unknown ones skipped), read from a fresh state after BOS.

    This is the reported metric of a split, of `rnnserve eval` and of POST /score alike; with `step`,
    read through that decoding step instead of the whole-sequence kernel.
    """
    ids = torch.tensor([vocab.bos, *vocab.encode(text, unknown="skip")], dtype=torch.long)
    return stream_loss(model, ids) if step is None else step_loss(step, model, ids)


def evaluate_splits(model_dir: Path, data: Corpus) -> dict[str, float]:
    """Reported metrics: one stream over each whole held-out split."""
    from app.checkpoint import load_checkpoint

    ckpt = load_checkpoint(model_dir)
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        loss = text_loss(ckpt.model, ckpt.vocab, data.text(split))
        metrics[f"{split}_nats_per_char"] = round(loss.nats_per_char, 4)
        metrics[f"{split}_bits_per_char"] = round(loss.bits_per_char, 4)
    return metrics
