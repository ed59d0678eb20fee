"""The trainer: stateful truncated BPTT with AdamW, clipping, warmup+cosine LR and resumable state."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from app.checkpoint import save_checkpoint
from app.nn import CharRNN, ModelConfig, State, state_from_parts, state_parts
from app.training.evaluate import stream_loss
from app.vocab import Vocab

log = logging.getLogger(__name__)

VAL_STREAMS = 16  # validation during training runs the split as 16 parallel streams, for speed
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype of the training forward
DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    arch: str = "lstm"
    embedding_size: int = 64
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.2
    # DropConnect on the recurrent weights (W_hh), one mask per window as in AWD-LSTM: a
    # regulariser the fused recurrent kernels keep, unlike dropout on the hidden state
    weight_drop: float = 0.0
    batch_size: int = 64
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 10_000
    eval_every: int = 500
    time_budget_s: float | None = None  # stop (after saving) once this much training time has passed
    seed: int = 1337
    threads: int = 0  # 0: torch's default
    # "bf16": forward and backward under bfloat16 autocast (fp32 weights, optimizer and
    # evaluation); several times faster on CPUs with AMX, refused on CPUs without bfloat16 kernels
    precision: str = "fp32"
    # where training runs: "cpu", or "cuda" where a GPU is there (the served model runs on CPUs)
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {sorted(DEVICES)}, got {self.device!r}")
        if not 0.0 <= self.weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1), got {self.weight_drop!r}")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            arch=self.arch,
            vocab_size=vocab_size,
            embedding_size=self.embedding_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            dropout=self.dropout,
        )


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast can run the recurrent kernels on `device` (on a CPU, oneDNN needs
    AVX512-BF16 or AMX: without them its LSTM refuses bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def hardware(device: torch.device) -> str:
    """What a run trains on, for the checkpoint's metadata."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()}-thread CPU"


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps or at the end of the
    time budget, whichever comes first (so a time-limited run still ends annealed)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.time_budget_s:
        progress = max(progress, min(1.0, elapsed / cfg.time_budget_s))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class StreamBatches:
    """The text as `batch_size` contiguous streams, read `seq_len` characters at a time.

    Window i of an epoch continues window i-1 in every stream, so the recurrent state can be
    carried from one window to the next (truncated BPTT).
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, seq_len: int) -> None:
        n = (len(ids) - 1) // batch_size
        if n < seq_len + 1:
            raise ValueError(f"text too short: {len(ids)} chars for batch {batch_size} x seq {seq_len}")
        self.x = ids[: n * batch_size].view(batch_size, n).t().contiguous()  # (N, B)
        self.y = ids[1 : n * batch_size + 1].view(batch_size, n).t().contiguous()  # (N, B)
        self.seq_len = seq_len
        self.windows = n // seq_len

    def window(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.seq_len
        return self.x[s : s + self.seq_len], self.y[s : s + self.seq_len]  # (T, B) each


def detach(state: State) -> State:
    """The state cut from the graph, in fp32 (autocast hands back bf16 states)."""
    return state_from_parts([t.detach().float() for t in state_parts(state)])


class Trainer:
    """Trains one model; `run_dir` holds resumable state, `out_dir` the best checkpoint."""

    def __init__(
        self,
        cfg: TrainConfig,
        vocab: Vocab,
        train_text: str,
        val_text: str,
        out_dir: Path,
        run_dir: Path,
        corpus: dict[str, Any] | None = None,
        previous: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.vocab = vocab
        self.out_dir = out_dir
        self.run_dir = run_dir
        self.corpus = corpus or {}
        # meta of the checkpoint this run continues (--init-from): its training counts as ours
        self.previous = previous or {}
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda needs a GPU that torch can use, and there is none here: use cpu")
        if cfg.precision == "bf16" and not bf16_supported(self.device):
            kind = torch.backends.cpu.get_cpu_capability() if self.device.type == "cpu" else "this GPU"
            raise ValueError(f"precision bf16 needs bfloat16 kernels, which {cfg.device} ({kind}) lacks: use fp32")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # cuDNN's recurrent kernels use TF32 already
        self.model = CharRNN(cfg.model_config(len(vocab))).to(self.device)
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.train_ids = torch.tensor(vocab.encode(train_text, unknown="skip"), dtype=torch.long, device=self.device)
        self.val_ids = torch.tensor(vocab.encode(val_text, unknown="skip"), dtype=torch.long, device=self.device)
        self.batches = StreamBatches(self.train_ids, cfg.batch_size, cfg.seq_len)
        self.step = 0
        self.elapsed = 0.0  # training seconds so far, across resumes
        self.best_val = math.inf
        self.curve: list[dict[str, float]] = []
        self.carry: State | None = None  # the recurrent state carried into the next window
        self.smoothed: float | None = None  # running average of the training loss

    # -- resumable state (safetensors + JSON, never pickle) ------------------------------

    def save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt = self.optim.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{pid}.{k}"] = v
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        tensors["rng.torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)  # dropout masks are drawn there
        if self.carry is not None:
            tensors.update({f"carry.{j}": t for j, t in enumerate(state_parts(self.carry))})
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        tmp = self.run_dir / "state.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.run_dir / "state.safetensors")
        info = {
            "train_config": asdict(self.cfg),
            "step": self.step,
            "elapsed": self.elapsed,
            "best_val": self.best_val,
            "curve": self.curve,
            "smoothed": self.smoothed,
            "param_groups": opt["param_groups"],
            "optim_scalars": scalars,
            "vocab": self.vocab.chars,
        }
        tmp = self.run_dir / "state.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.run_dir / "state.json")

    def load_state(self) -> bool:
        path = self.run_dir / "state.json"
        if not path.exists():
            return False
        info = json.loads(path.read_text())
        if info["vocab"] != self.vocab.chars:
            raise ValueError(f"{self.run_dir}: saved run has a different vocabulary")
        tensors = load_file(str(self.run_dir / "state.safetensors"))
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, pid, key = k.split(".", 2)
                state.setdefault(int(pid), {})[key] = v
        for pid, extra in info["optim_scalars"].items():
            state.setdefault(int(pid), {}).update(extra)
        self.optim.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        carry = [tensors[k].to(self.device) for k in ("carry.0", "carry.1") if k in tensors]
        self.carry = state_from_parts(carry) if carry else None
        self.smoothed = info.get("smoothed")
        self.step, self.elapsed = info["step"], info["elapsed"]
        self.best_val, self.curve = info["best_val"], info["curve"]
        return True

    # -- training ------------------------------------------------------------------------

    def evaluate(self) -> float:
        return stream_loss(self.model, self.val_ids, streams=VAL_STREAMS).nats_per_char

    def save_best(self, val: float) -> None:
        before = self.previous.get("training", {})
        steps0, seen0, seconds0 = (before.get(k, 0) for k in ("steps", "chars_seen", "train_seconds"))
        training = {
            **asdict(self.cfg),
            "steps": steps0 + self.step,
            "chars_seen": seen0 + self.step * self.cfg.batch_size * self.cfg.seq_len,
            "train_seconds": round(seconds0 + self.elapsed, 1),
            "parameters": self.model.num_parameters,
            "hardware": hardware(self.device),
        }
        if before:
            training["continued_from"] = before
        curve = [{**p, "step": steps0 + p["step"], "seconds": round(seconds0 + p["seconds"], 1)} for p in self.curve]
        meta = {
            "corpus": self.corpus,
            "training": training,
            "metrics": {"val_nats_per_char_16_streams": round(val, 4)},
            "curve": self.previous.get("curve", []) + curve,
        }
        save_checkpoint(self.out_dir, self.model, self.vocab, meta)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, State]:
        """The training forward of window `x` from the carried state, its recurrent weights dropped."""
        if not self.cfg.weight_drop or not self.model.training:
            return self.model(x, self.carry)
        p = self.cfg.weight_drop
        dropped = {n: F.dropout(w, p) for n, w in self.model.named_parameters() if n.startswith("rnn.weight_hh")}
        return torch.func.functional_call(self.model, dropped, (x, self.carry))

    @property
    def finished(self) -> bool:
        out_of_time = self.cfg.time_budget_s is not None and self.elapsed >= self.cfg.time_budget_s
        return self.step >= self.cfg.max_steps or out_of_time

    def train(self, progress: bool = True, on_step: Callable[[float | None], None] | None = None) -> float:
        """Train until max_steps or the time budget; returns the best validation loss.

        `on_step` is called after every step with the validation loss when one was just measured
        (else None); an exception it raises ends the run.
        """
        cfg = self.cfg
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not progress, dynamic_ncols=True)
        window_chars = cfg.batch_size * cfg.seq_len
        autocast = PRECISIONS[cfg.precision]
        tick = time.perf_counter()
        while not self.finished:
            i = self.step % self.batches.windows
            if i == 0:
                self.carry = None  # new epoch: streams restart at the beginning
            x, y = self.batches.window(i)
            for group in self.optim.param_groups:
                group["lr"] = lr_at(self.step, cfg, self.elapsed)
            with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                logits, state = self.forward(x)
            self.carry = detach(state)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optim.step()
            self.step += 1
            now = time.perf_counter()
            dt, tick = now - tick, now
            self.elapsed += dt
            smoothed = loss.item() if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss.item()
            self.smoothed = smoothed
            bar.update(1)
            bar.set_postfix(loss=f"{smoothed:.3f}", chars_s=f"{window_chars / max(dt, 1e-9):.0f}")
            val: float | None = None
            if self.step % cfg.eval_every == 0 or self.finished:
                val = self.evaluate()
                self.curve.append(
                    {
                        "step": self.step,
                        "seconds": round(self.elapsed, 1),
                        "train": round(smoothed, 4),
                        "val": round(val, 4),
                    }
                )
                bar.write(f"step {self.step}: train {smoothed:.4f} val {val:.4f} nats/char ({self.elapsed:.0f}s)")
                if val < self.best_val:
                    self.best_val = val
                    self.save_best(val)
                self.save_state()
                tick = time.perf_counter()  # evaluation time is not training time
            if on_step is not None:
                on_step(val)
        bar.close()
        return self.best_val


def train_config_from(args: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a mapping, ignoring keys that are not fields (CLI namespaces)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in args.items() if k in names and v is not None})
