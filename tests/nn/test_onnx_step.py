"""The ONNX Runtime kernels: the decoding step and the prompt reader agree with the torch model."""

from __future__ import annotations

from collections.abc import Callable

import onnx
import pytest
import torch

from app.cpus import CpuBudget
from app.nn import ARCHS, CharRNN, FusedStep, State, select_state, state_from_parts, state_parts
from app.nn.onnx_step import QUANT_BLOCK, OnnxPrefill, OnnxStep, quantize_weights


def _random_state(model: CharRNN, batch: int, g: torch.Generator) -> State:
    return state_from_parts([torch.randn(t.shape, generator=g) for t in state_parts(model.zero_state(batch))])


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_the_onnx_step_equals_the_fused_step(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    state = _random_state(model, 5, g)
    ids = torch.randint(0, model.config.vocab_size, (5,), generator=g)
    logits, after = OnnxStep(model)(ids, state)
    ref_logits, ref_after = FusedStep(model)(ids, state)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(state_parts(after), state_parts(ref_after), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_the_prompt_reader_reads_each_row_to_its_own_length(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    assert not model.training
    g = torch.Generator().manual_seed(2)
    lengths = [1, 9, 4, 17]
    rows = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    state = _random_state(model, len(rows), g)
    logits, after = OnnxPrefill(model)(rows, state)
    assert logits.shape == (len(rows), model.config.vocab_size)
    assert not model.training, "exporting left the model in training mode"
    for i, row in enumerate(rows):
        ref_logits, ref_after = model(torch.tensor(row).view(-1, 1), select_state(state, torch.tensor([i])))
        torch.testing.assert_close(logits[i], ref_logits[-1, 0], rtol=1e-5, atol=1e-5)
        mine = select_state(after, torch.tensor([i]))
        for a, b in zip(state_parts(mine), state_parts(ref_after), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@torch.inference_mode()
def test_the_int8_step_is_the_fused_step_on_rounded_weights(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch, hidden_size=QUANT_BLOCK + 8)  # a whole block and a partial one
    g = torch.Generator().manual_seed(3)
    state = _random_state(model, 6, g)
    ids = torch.randint(0, model.config.vocab_size, (6,), generator=g)
    logits, after = OnnxStep(model, weights="int8")(ids, state)
    ref_logits, ref_after = FusedStep(model)(ids, state)
    # off by the rounding of weights and activations to 8 bits (a scale per block), no more
    error = (logits - ref_logits).abs().max().item()
    assert 0 < error < 0.02 * ref_logits.abs().max().item()
    for a, b in zip(state_parts(after), state_parts(ref_after), strict=True):
        assert 0 < (a - b).abs().max().item() < 0.02


def test_quantizing_refuses_what_it_cannot_quantize(tiny_model: Callable[..., CharRNN]) -> None:
    with pytest.raises(ValueError, match="weights must be one of fp32, int8"):
        OnnxStep(tiny_model("lstm"), weights="int4")
    empty = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    with pytest.raises(RuntimeError, match="no weight matrix was quantized"):
        quantize_weights(empty)


def test_threads_default_to_the_cpu_budget_and_spin_only_within_it(
    tiny_model: Callable[..., CharRNN], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.nn.onnx_step.cpu_budget", lambda: CpuBudget(2, "cgroup cpu.max"))

    def options(threads: int) -> tuple[int, str]:
        opts = OnnxStep(tiny_model("gru"), threads=threads).session.get_session_options()
        return opts.intra_op_num_threads, opts.get_session_config_entry("session.intra_op.allow_spinning")

    assert options(0) == (2, "1")
    assert options(1) == (1, "1")
    assert options(3) == (3, "0")  # more threads than CPUs: they would spin on each other's cores
