"""Training defaults sized from the corpus: a small text gets a small model and short, few windows.

The rule, for a training split of N characters:
- hidden_size: the largest of 32, 64, 128, 256, 512 whose model (2 layers, embedding min(64, hidden))
  has at most N parameters (about one parameter per training character; 32 at least);
- seq_len: 128, but at most N / 64 (16 at least); batch_size: 64, but at most N / (16 * seq_len)
  (1 at least), so an epoch has at least 16 windows per stream;
- max_steps: 20 epochs, at most 10,000; eval_every: max_steps / 20 (10..500); warmup_steps:
  max_steps / 10 (at most 200).
A Shakespeare-sized corpus (millions of characters) gets TrainConfig's own defaults.
"""

from __future__ import annotations

from typing import Any

HIDDEN_SIZES = (32, 64, 128, 256, 512)
LAYERS = 2
EPOCHS = 20


def parameters(arch: str, vocab_size: int, hidden_size: int, num_layers: int, embedding_size: int) -> int:
    """CharRNN's parameter count: embedding, the recurrent layers (two bias vectors each), the head."""
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[arch]
    h = hidden_size
    layers = sum(gates * h * ((embedding_size if i == 0 else h) + h + 2) for i in range(num_layers))
    return vocab_size * embedding_size + layers + h * vocab_size + vocab_size


def sized_defaults(train_chars: int, vocab_size: int, arch: str = "lstm") -> dict[str, Any]:
    """TrainConfig fields for a training split of `train_chars` characters (see the module docstring)."""
    hidden = HIDDEN_SIZES[0]
    for size in HIDDEN_SIZES:
        if parameters(arch, vocab_size, size, LAYERS, min(64, size)) <= train_chars:
            hidden = size
    seq_len = max(16, min(128, train_chars // 64))
    batch_size = max(1, min(64, train_chars // (16 * seq_len)))
    windows = max(1, (train_chars - 1) // batch_size // seq_len)
    max_steps = max(1, min(10_000, EPOCHS * windows))
    return {
        "hidden_size": hidden,
        "num_layers": LAYERS,
        "embedding_size": min(64, hidden),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_steps": max_steps,
        "eval_every": max(10, min(500, max_steps // 20)),
        "warmup_steps": min(200, max_steps // 10),
    }
