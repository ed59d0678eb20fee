"""The README's model report: table rows, samples and the loss-curve plot from checkpoint metadata."""

from __future__ import annotations

from pathlib import Path

from app.checkpoint import load_checkpoint, save_checkpoint
from app.nn import CharRNN, ModelConfig
from app.training import report
from app.vocab import Vocab


def test_report_writes_table_samples_and_plot(tmp_path: Path) -> None:
    vocab = Vocab("\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    meta = {
        "metrics": {"val_nats_per_char": 1.5, "val_bits_per_char": 2.164, "test_nats_per_char": 1.6,
                    "test_bits_per_char": 2.308},
        "training": {"steps": 20, "chars_seen": 163_840, "train_seconds": 120, "batch_size": 64, "seq_len": 128,
                     "hardware": "NVIDIA H200"},
        "curve": [{"step": 10, "train": 3.0, "val": 2.9}, {"step": 20, "train": 2.5, "val": 2.4}],
    }  # fmt: skip
    save_checkpoint(tmp_path / "m" / "tiny-gru", CharRNN(ModelConfig("gru", len(vocab), 8, 16, 1)), vocab, meta)
    ckpt = load_checkpoint(tmp_path / "m" / "tiny-gru")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- models:start -->\nold\n<!-- models:end -->\ntail\n")
    report.write([ckpt], readme, tmp_path / "docs" / "curves.png")
    text = readme.read_text()
    assert "old" not in text and text.endswith("tail\n")
    assert "| tiny-gru | gru | 1 x 16 |" in text and "| 1.500 | 2.164 | 1.600 | 2.308 |" in text
    assert "2 min on NVIDIA H200, 20 steps, 0.2M chars" in text
    assert text.count("```\nROMEO:\n") == 3  # greedy, temperature 0.8 and 1.0
    assert "![training and validation loss](docs/curves.png)" in text
    assert (tmp_path / "docs" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_code_model_gets_a_code_prompt(tmp_path: Path) -> None:
    vocab = Vocab("\n (),:=GST_abcdefghijklmnopqrstuvwxyz")
    meta = {"corpus": {"name": "networkx-3.4.2-python"}, "metrics": {}, "training": {}, "curve": []}
    save_checkpoint(tmp_path / "python-tiny", CharRNN(ModelConfig("lstm", len(vocab), 8, 16, 1)), vocab, meta)
    ckpt = load_checkpoint(tmp_path / "python-tiny")
    assert report.sample_prompt(ckpt) == report.CODE_PROMPT
    text = report.samples([ckpt], n=20)
    assert text.count(f"```\n{report.CODE_PROMPT}") == 3 and "ROMEO" not in text
