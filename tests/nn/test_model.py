"""CharRNN: stateful chunking, batch independence, state helpers and config validation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from app.nn import ARCHS, CharRNN, ModelConfig, State, select_state, split_state, stack_states


def _as_tuple(state: State) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


def _assert_state_close(a: State, b: State, atol: float = 1e-6) -> None:
    ta, tb = _as_tuple(a), _as_tuple(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb, strict=True):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=atol)


def _random_state(model: CharRNN, batch: int) -> State:
    c = model.config
    h = torch.randn(c.num_layers, batch, c.hidden_size)
    return (h, torch.randn_like(h)) if c.arch == "lstm" else h


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_chunked_forward_with_carried_state_equals_one_call(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (23, 2))  # (T, B)
    full_logits, full_state = model(ids)

    pieces, state = [], None
    for start, stop in [(0, 1), (1, 8), (8, 9), (9, 23)]:
        logits, state = model(ids[start:stop], state)
        pieces.append(logits)
    assert state is not None
    assert torch.allclose(torch.cat(pieces), full_logits, atol=1e-6)
    _assert_state_close(state, full_state)


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_state_shapes(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    state = model.zero_state(3)
    if arch == "lstm":
        assert isinstance(state, tuple) and len(state) == 2
    else:
        assert isinstance(state, torch.Tensor)
    for t in _as_tuple(state):
        assert t.shape == (2, 3, 16)
        assert not t.any()
    assert _as_tuple(model.zero_state())[0].shape == (2, 1, 16)


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_zero_state_is_the_default_state(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (5, 2))
    a, _ = model(ids)
    b, _ = model(ids, model.zero_state(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_then_split_round_trips(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    singles = [_random_state(model, 1) for _ in range(3)]
    stacked = stack_states(singles)
    assert _as_tuple(stacked)[0].shape == (2, 3, 16)
    parts = split_state(stacked)
    assert len(parts) == 3
    for part, single in zip(parts, singles, strict=True):
        for p, s in zip(_as_tuple(part), _as_tuple(single), strict=True):
            assert torch.equal(p, s)
    # the parts are copies: writing to one leaves the batched state alone
    _as_tuple(parts[0])[0].fill_(7.0)
    assert not torch.equal(_as_tuple(stacked)[0][:, :1], _as_tuple(parts[0])[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_states_of_mixed_batch_sizes(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    a, b = _random_state(model, 2), _random_state(model, 1)
    stacked = stack_states([a, b])
    for s, x, y in zip(_as_tuple(stacked), _as_tuple(a), _as_tuple(b), strict=True):
        assert s.shape == (2, 3, 16)
        assert torch.equal(s[:, :2], x)
        assert torch.equal(s[:, 2:], y)


@pytest.mark.parametrize("arch", ARCHS)
def test_select_state_picks_rows(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    state = _random_state(model, 4)
    index = torch.tensor([2, 0, 2])
    picked = select_state(state, index)
    assert type(picked) is type(state)
    for p, s in zip(_as_tuple(picked), _as_tuple(state), strict=True):
        assert p.shape == (2, 3, 16)
        assert torch.equal(p[:, 0], s[:, 2])
        assert torch.equal(p[:, 1], s[:, 0])
        assert torch.equal(p[:, 2], s[:, 2])


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_batched_forward_equals_separate_forwards(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, model.config.vocab_size, (11, 3))
    states = [_random_state(model, 1) for _ in range(3)]
    batched_logits, batched_state = model(ids, stack_states(states))
    parts = split_state(batched_state)
    for b in range(3):
        logits, state = model(ids[:, b : b + 1], states[b])
        assert torch.allclose(batched_logits[:, b : b + 1], logits, atol=1e-6)
        _assert_state_close(parts[b], state)
    # and the three sequences really differ, so the comparison above is not vacuous
    assert not torch.allclose(batched_logits[:, 0], batched_logits[:, 1])


@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_forward_shapes(arch: str, tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model(arch)
    logits, state = model(torch.zeros(7, 5, dtype=torch.long))
    assert logits.shape == (7, 5, model.config.vocab_size)
    for t in _as_tuple(state):
        assert t.shape == (2, 5, 16)


@pytest.mark.parametrize(
    "fields",
    [
        {"arch": "transformer"},
        {"arch": "LSTM"},
        {"dropout": -0.1},
        {"dropout": 1.0},
        {"hidden_size": 0},
        {"num_layers": 0},
        {"vocab_size": 0},
        {"embedding_size": 0},
    ],
)
def test_model_config_rejects_bad_values(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelConfig(**fields)  # type: ignore[arg-type]


def test_model_config_to_dict_round_trips() -> None:
    config = ModelConfig(arch="gru", vocab_size=10, embedding_size=4, hidden_size=8, num_layers=1, dropout=0.0)
    assert ModelConfig(**config.to_dict()) == config


def test_lstm_forget_gate_bias_is_one(tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model("lstm")
    h = model.config.hidden_size
    for layer in range(model.config.num_layers):
        b_ih = getattr(model.rnn, f"bias_ih_l{layer}")
        b_hh = getattr(model.rnn, f"bias_hh_l{layer}")
        # gate order (input, forget, cell, output): the effective forget bias is b_ih + b_hh = 1
        assert torch.equal(b_ih[h : 2 * h], torch.ones(h))
        assert torch.equal(b_hh[h : 2 * h], torch.zeros(h))
        assert not torch.equal(b_ih[:h], torch.ones(h))  # only the forget gate


def test_single_layer_model_has_no_inter_layer_dropout(tiny_model: Callable[..., CharRNN]) -> None:
    model = tiny_model("gru", num_layers=1, dropout=0.5)
    assert model.rnn.dropout == 0.0
    assert model.drop.p == 0.5
