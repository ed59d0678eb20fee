"""ONNX Runtime kernels of a CharRNN: the fused decoding step, and the whole-sequence prompt reader.

Same inputs, outputs and results (within float rounding) as FusedStep and CharRNN.forward, faster
on a CPU. Built in memory from the loaded weights at startup, so a checkpoint stays plain
safetensors. The decoding step may also run on weights quantized to 8 bits (`WEIGHTS`).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from app.cpus import cpu_budget
from app.nn.fused import FusedStep
from app.nn.model import CharRNN, State, Step, state_from_parts, state_parts

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# The decoding step's weights: the checkpoint's own ("fp32"), or 8-bit integers in blocks of
# QUANT_BLOCK along the input dimension, one fp32 scale per block ("int8", ONNX Runtime's
# MatMulNBits, the activations quantized per block of each row for integer dot products): a
# quarter of the bytes a character reads, which is what bounds the step of a few rows.
WEIGHTS = ("fp32", "int8")
QUANT_BLOCK = 64


class _Exportable(nn.Module):
    def __init__(self, fn: Step, lstm: bool) -> None:
        super().__init__()
        self.fn = fn
        self.lstm = lstm

    def forward(self, ids: Tensor, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, ...]:
        logits, state = self.fn(ids, (h, c) if self.lstm else h)  # type: ignore[arg-type]
        return (logits, *state_parts(state))


def _session(model: CharRNN, fn: Step, ids: Tensor, threads: int,
             lengths: bool = False, weights: str = "fp32") -> ort.InferenceSession:  # fmt: skip
    """Export `fn(ids, state) -> (logits, state)` (ids batched on their last dim) and open it in ONNX Runtime.

    `threads`: ONNX Runtime's intra-op threads, 0: the CPU budget (app.cpus). `lengths`: the graph takes
    one more input, `lens` (B,) int32, each row's length: its recurrent ops then stop each row at its own
    length (ONNX's `sequence_lens`). `weights`: one of WEIGHTS.
    """
    c = model.config
    lstm = c.arch == "lstm"
    batch = ids.shape[-1]
    zero = torch.zeros(c.num_layers, batch, c.hidden_size)
    names = ["ids", "h", "c"] if lstm else ["ids", "h"]
    outputs = ["logits", "h_out", "c_out"] if lstm else ["logits", "h_out"]
    ids_axes = {0: "B"} if ids.dim() == 1 else {0: "T", 1: "B"}
    axes = {"ids": ids_axes, "logits": {0: "B"}, **{n: {1: "B"} for n in (*names[1:], *outputs[1:])}}
    training = model.training  # the wrapper's eval() reaches the model; the export leaves it so
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its own deprecation
            path = Path(tmp) / "kernel.onnx"
            wrapper = _Exportable(fn, lstm).eval()
            torch.onnx.export(
                wrapper, (ids, *((zero,) * (2 if lstm else 1))), str(path), input_names=names, output_names=outputs,
                dynamic_axes=axes, dynamo=False,
            )  # fmt: skip
            graph = onnx.load(str(path))
    finally:
        model.train(training)
    if lengths:
        recurrent = [node for node in graph.graph.node if node.op_type in RECURRENT_OPS]
        if len(recurrent) != c.num_layers:
            raise RuntimeError(f"expected one recurrent op per layer in the exported graph, found {len(recurrent)}")
        graph.graph.input.append(onnx.helper.make_tensor_value_info("lens", onnx.TensorProto.INT32, ["B"]))
        for node in recurrent:
            node.input[4] = "lens"  # sequence_lens
    if weights == "int8":
        graph = quantize_weights(graph)
    budget = cpu_budget().count
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or budget
    options.inter_op_num_threads = 1
    # the threads spin between the parallel sections of a call (a step of a few rows is a handful of
    # short matrix products, each of which would otherwise wake a sleeping thread) and stop as soon as
    # the call returns: between calls they take no core from the event loop. More threads than the
    # CPUs this process may use would spin on each other's cores: they sleep instead.
    spinning = "1" if options.intra_op_num_threads <= budget else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])


def quantize_weights(graph: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every product by a weight matrix on 8-bit block-quantized weights (WEIGHTS)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    nodes = []
    for node in graph.graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and node.attribute[0].name == "value" else None
        if value is not None and len(value.dims) == 2:  # a weight matrix: the quantizer takes initializers only
            value.name = node.output[0]
            graph.graph.initializer.append(value)
        elif node.op_type == "Gemm":  # addmm: the quantizer takes MatMul only
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            scaled = attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0
            if attrs.get("transA", 0) or attrs.get("transB", 0) or scaled:
                raise RuntimeError(f"cannot quantize {node.name}: a Gemm with {attrs}")
            product = node.output[0] + "_product"
            nodes.append(onnx.helper.make_node("MatMul", node.input[:2], [product], name=node.name + "_matmul"))
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], node.output, name=node.name + "_add"))
        else:
            nodes.append(node)
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    quantizer = MatMulNBitsQuantizer(graph, bits=8, block_size=QUANT_BLOCK, is_symmetric=True, accuracy_level=4)
    chatty = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = chatty.level
    chatty.setLevel(logging.WARNING)  # it logs a line per node at INFO
    try:
        quantizer.process()
    finally:
        chatty.setLevel(level)
    quantized: onnx.ModelProto = quantizer.model.model
    if not any(node.op_type == "MatMulNBits" for node in quantized.graph.node):
        raise RuntimeError("no weight matrix was quantized")
    return quantized


def _feed(state: State) -> dict[str, np.ndarray]:
    return dict(zip(("h", "c"), (t.contiguous().numpy() for t in state_parts(state)), strict=False))


def _unpack(outputs: list[np.ndarray]) -> tuple[Tensor, State]:
    logits, *parts = (torch.from_numpy(o) for o in outputs)
    return logits, state_from_parts(parts)


class OnnxStep:
    """The fused decoding step (FusedStep) run by ONNX Runtime, on the weights `weights` (one of WEIGHTS)."""

    def __init__(self, model: CharRNN, threads: int = 0, weights: str = "fp32") -> None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}")
        self.weights = weights
        self.session = _session(model, FusedStep(model), torch.zeros(8, dtype=torch.long), threads, weights=weights)

    def __call__(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (B,) -> logits (B, V) and the next state, as FusedStep."""
        return _unpack(self.session.run(None, {"ids": ids.numpy(), **_feed(state)}))


class _LastLogits(nn.Module):
    """A whole sequence -> the logits after its last id, and the state there."""

    def __init__(self, model: CharRNN) -> None:
        super().__init__()
        self.model = model  # a submodule: its weights export as the graph's initializers

    def forward(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        _, after = self.model.rnn(self.model.embed(ids), state)  # (L, B, H) each
        return self.model.head(state_parts(after)[0][-1]), after  # from the top layer's last output (B, V)


class OnnxPrefill:
    """Reads several prompts at once with the whole-sequence recurrent ops, each row to its own length."""

    def __init__(self, model: CharRNN, threads: int = 0) -> None:
        ids = torch.zeros(4, 2, dtype=torch.long)
        self.session = _session(model, _LastLogits(model), ids, threads, lengths=True)

    def __call__(self, rows: list[list[int]], state: State) -> tuple[Tensor, State]:
        """rows (B lists of ids, none empty) from `state` (batch B) -> the logits after each row's
        last id (B, V) and the state there."""
        ids = np.zeros((max(len(r) for r in rows), len(rows)), dtype=np.int64)  # (T, B), padded
        for j, row in enumerate(rows):
            ids[: len(row), j] = row
        lens = np.array([len(r) for r in rows], dtype=np.int32)
        return _unpack(self.session.run(None, {"ids": ids, "lens": lens, **_feed(state)}))
