"""OnnxStep: the fused decoding step exported to ONNX and run by ONNX Runtime.

Same inputs, outputs and results (within float rounding) as FusedStep, faster on a CPU. Built in
memory from the loaded weights at startup, so a checkpoint stays plain safetensors.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from app.nn.fused import FusedStep
from app.nn.model import CharRNN, State


class _Exportable(nn.Module):
    def __init__(self, step: FusedStep, lstm: bool) -> None:
        super().__init__()
        self.step = step
        self.lstm = lstm

    def forward(self, ids: Tensor, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, ...]:
        if self.lstm:
            assert c is not None
            logits, (h2, c2) = self.step(ids, (h, c))
            return logits, h2, c2
        logits, h2 = self.step(ids, h)
        return logits, h2  # type: ignore[return-value]


class OnnxStep:
    def __init__(self, model: CharRNN, threads: int = 0) -> None:
        self.lstm = model.config.arch == "lstm"
        c = model.config
        batch = 8
        args: tuple[Tensor, ...] = (
            torch.zeros(batch, dtype=torch.long),
            *((torch.zeros(c.num_layers, batch, c.hidden_size),) * (2 if self.lstm else 1)),
        )
        names = ["ids", "h", "c"] if self.lstm else ["ids", "h"]
        outputs = ["logits", "h_out", "c_out"] if self.lstm else ["logits", "h_out"]
        axes = {"ids": {0: "B"}, "logits": {0: "B"}, **{n: {1: "B"} for n in (*names[1:], *outputs[1:])}}
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its own deprecation
            path = Path(tmp) / "step.onnx"
            torch.onnx.export(
                _Exportable(FusedStep(model), self.lstm), args, str(path), input_names=names, output_names=outputs,
                dynamic_axes=axes, dynamo=False,
            )  # fmt: skip
            onnx_bytes = path.read_bytes()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle between steps: no busy-wait
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,) -> logits (B, V) and the next state, as FusedStep."""
        feed: dict[str, np.ndarray] = {"ids": ids.numpy()}
        if self.lstm:
            h, c = state
            feed.update(h=h.contiguous().numpy(), c=c.contiguous().numpy())
            logits, h2, c2 = self.session.run(None, feed)
            return torch.from_numpy(logits), (torch.from_numpy(h2), torch.from_numpy(c2))
        feed["h"] = state.contiguous().numpy()  # type: ignore[union-attr]
        logits, h2 = self.session.run(None, feed)
        return torch.from_numpy(logits), torch.from_numpy(h2)
