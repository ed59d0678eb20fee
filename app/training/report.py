"""The model report of the docs: comparison table, loss-curve plot and samples of each model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from app.checkpoint import Checkpoint
from app.engine.generate import generate
from app.engine.sampling import SamplingParams
from app.engine.sequence import GenerationRequest
from app.nn.onnx_step import OnnxStep
from app.tools.readme import write_section

SAMPLE_PROMPT = "ROMEO:\n"
CODE_PROMPT = "def shortest_path(G, source, target):\n"
SAMPLE_SEED = 1


def sample_prompt(ckpt: Checkpoint) -> str:
    """A prompt in the model's own domain."""
    return CODE_PROMPT if "python" in ckpt.meta.get("corpus", {}).get("name", "") else SAMPLE_PROMPT


def fmt_time(seconds: float) -> str:
    return f"{seconds / 60:.0f} min"


@torch.inference_mode()
def chars_per_second(ckpt: Checkpoint, n: int = 2000) -> float:
    """Single-stream decoding speed of the step the server decodes with (ONNX Runtime, batch 1), on this machine."""
    step = OnnxStep(ckpt.model, threads=torch.get_num_threads())
    state = ckpt.model.zero_state(1)
    ids = torch.tensor([ckpt.vocab.bos])
    start = time.perf_counter()
    for _ in range(n):
        logits, state = step(ids, state)
        ids = logits.argmax(dim=-1)
    return n / (time.perf_counter() - start)


def table(ckpts: list[Checkpoint]) -> str:
    rows = [
        "| model | cell | layers x hidden | parameters | val nats/char | val bits/char | test nats/char "
        "| test bits/char | training | kernel chars/s, 1 row (not served) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for c in ckpts:
        cfg, m, t = c.model.config, c.meta.get("metrics", {}), c.meta.get("training", {})
        steps, seen = t.get("steps", 0), t.get("chars_seen", 0)
        trained = f"{fmt_time(t.get('train_seconds', 0))} on {t.get('hardware', 'CPU')}"
        rows.append(
            f"| {c.name} | {cfg.arch} | {cfg.num_layers} x {cfg.hidden_size} | {c.model.num_parameters:,} "
            f"| {m.get('val_nats_per_char', float('nan')):.3f} | {m.get('val_bits_per_char', float('nan')):.3f} "
            f"| {m.get('test_nats_per_char', float('nan')):.3f} | {m.get('test_bits_per_char', float('nan')):.3f} "
            f"| {trained}, {steps:,} steps, {seen / 1e6:.1f}M chars "
            f"| {chars_per_second(c):,.0f} |"
        )
    return "\n".join(rows)


def samples(ckpts: list[Checkpoint], n: int = 240) -> str:
    out = []
    for c in ckpts:
        prompt = sample_prompt(c)
        out.append(f"**{c.name}**, prompt `{prompt!r}`, seed {SAMPLE_SEED}:\n")
        for label, params in (
            ("greedy", SamplingParams(strategy="greedy")),
            ("temperature 0.8", SamplingParams(temperature=0.8)),
            ("temperature 1.0", SamplingParams(temperature=1.0)),
        ):
            ids = [c.vocab.bos, *c.vocab.encode(prompt)]
            result = generate(c.model, c.vocab.chars, GenerationRequest(ids, n, params, SAMPLE_SEED), None)
            out.append(f"_{label}_\n\n```\n{prompt}{c.vocab.decode(result.ids)}\n```\n")
    return "\n".join(out)


def plot(ckpts: list[Checkpoint], path: Path) -> None:
    """Training and validation loss (nats/char) against characters seen, one colour per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for c, colour in zip(ckpts, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False):
        curve = c.meta.get("curve", [])
        t = c.meta.get("training", {})
        per_step = t.get("batch_size", 64) * t.get("seq_len", 128) / 1e6
        x = [p["step"] * per_step for p in curve]
        ax.plot(x, [p["train"] for p in curve], "--", color=colour, label=f"{c.name} train")
        ax.plot(x, [p["val"] for p in curve], "-", color=colour, label=f"{c.name} validation")
    ax.set_xscale("log")  # runs from minutes on CPUs to a GPU's hundreds of millions of characters
    ax.set_xlabel("training characters (millions, log scale)")
    ax.set_ylabel("nats/char")
    lowest = min((min(p["train"], p["val"]) for c in ckpts for p in c.meta.get("curve", [])), default=1.3)
    ax.set_ylim(min(1.2, lowest - 0.1), 2.6)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write(ckpts: list[Checkpoint], page: Path, plot_path: Path) -> None:
    plot(ckpts, plot_path)
    rel = plot_path.relative_to(page.parent) if plot_path.is_relative_to(page.parent) else plot_path
    body = (
        f"{table(ckpts)}\n\n![training and validation loss]({rel})\n\n"
        f"Samples (the same prompt and seed for every model of a domain):\n\n{samples(ckpts)}"
    )
    write_section(page, "models", body)
    print(json.dumps({c.name: c.meta.get("metrics") for c in ckpts}, indent=2))
