"""Inspecting a model: activations equal an independent computation; features and correlations."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from app.engine.inspect import (
    DEFAULT_UNITS,
    TOP_CORRELATED,
    best_units,
    correlations,
    default_units,
    inspect,
    layer_states,
    text_features,
)
from app.nn import CharRNN
from app.vocab import Vocab

TEXT = "ROMEO.\nBut soft, what light!\n\nJULIET.\nAy me.\n"


def cell_of(model: CharRNN, layer: int) -> nn.RNNCellBase:
    """Layer `layer` of the model's stacked recurrent module, as a standalone cell with its weights."""
    cfg = model.config
    size = cfg.embedding_size if layer == 0 else cfg.hidden_size
    cell: nn.RNNCellBase = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[cfg.arch](size, cfg.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(model.rnn, f"{name}_l{layer}"))
    return cell


@torch.no_grad()
def by_cells(model: CharRNN, ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Every layer's h and c (c: LSTM only) for every character, and the log-probabilities, from cells."""
    cfg = model.config
    x = model.embed(torch.tensor(ids))  # (T, E)
    hs, cs = [], []
    for layer in range(cfg.num_layers):
        cell = cell_of(model, layer)
        h = torch.zeros(1, cfg.hidden_size)
        c = torch.zeros(1, cfg.hidden_size)
        out_h, out_c = [], []
        for t in range(x.shape[0]):
            if cfg.arch == "lstm":
                h, c = cell(x[t : t + 1], (h, c))
            else:
                h = cell(x[t : t + 1], h)
            out_h.append(h[0])
            out_c.append(c[0])
        hs.append(torch.stack(out_h))
        cs.append(torch.stack(out_c))
        x = hs[-1]
    return hs, cs, torch.softmax(model.head(hs[-1]), dim=-1)


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_activations_equal_the_layers_run_as_cells(arch: str, tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model(arch, num_layers=2)
    ids = [vocab.bos, *vocab.encode(TEXT)]
    hs, cs, probs = by_cells(model, ids)
    kinds = ("h", "c") if arch == "lstm" else ("h",)
    for layer in range(2):
        for kind in kinds:
            acts, got_probs = layer_states(model, ids, layer, kind)
            want = (hs if kind == "h" else cs)[layer][1:]  # after each character of the text (not BOS)
            assert acts.shape == (len(TEXT), model.config.hidden_size)
            torch.testing.assert_close(acts, want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_probs, probs[1:], rtol=1e-5, atol=1e-6)


def test_inspect_returns_the_chosen_units_and_the_top_predictions(
    tiny_model: Callable[..., CharRNN], vocab: Vocab
) -> None:
    model = tiny_model("lstm")
    ids = [vocab.bos, *vocab.encode(TEXT)]
    trace = inspect(model, ids, TEXT, layer=1, kind="c", units=[3, 0, 7], top=4)
    acts, probs = layer_states(model, ids, 1, "c")
    assert trace.units == [3, 0, 7]
    assert len(trace.activations) == len(TEXT) and all(len(row) == 3 for row in trace.activations)
    torch.testing.assert_close(torch.tensor(trace.activations), acts[:, [3, 0, 7]], atol=1e-4, rtol=0)
    assert len(trace.top) == len(TEXT)
    for t, row in enumerate(trace.top):
        assert len(row) == 4
        assert [p for _, p in row] == sorted((p for _, p in row), reverse=True)
        assert row[0][0] == int(probs[t].argmax())
        assert row[0][1] == pytest.approx(float(probs[t].max()), abs=1e-4)


def test_default_units_follow_the_features(tiny_model: Callable[..., CharRNN], vocab: Vocab) -> None:
    model = tiny_model("gru")
    ids = [vocab.bos, *vocab.encode(TEXT)]
    trace = inspect(model, ids, TEXT, layer=0, kind="h", units=None, top=5)
    assert len(trace.units) == min(DEFAULT_UNITS, model.config.hidden_size)
    assert len(set(trace.units)) == len(trace.units)
    firsts = [pairs[0][0] for pairs in trace.features.values() if pairs]
    assert trace.units[: len(set(firsts))] == list(dict.fromkeys(firsts))


def test_text_features() -> None:
    f = text_features('AB.\nx (y [z]) "q" w\n')
    assert f["column"].tolist() == [0, 1, 2, 3, *range(16)]
    assert f["line_end"].tolist() == [c == "\n" for c in 'AB.\nx (y [z]) "q" w\n']
    brackets = "".join(ch for ch, b in zip('AB.\nx (y [z]) "q" w\n', f["in_brackets"].tolist(), strict=True) if b)
    assert brackets == "(y [z]"  # inside after reading: the opener counts, the closer does not
    quoted = "".join(ch for ch, b in zip('AB.\nx (y [z]) "q" w\n', f["in_quotes"].tolist(), strict=True) if b)
    assert quoted == '"q'
    assert f["speaker"].tolist()[:4] == [1, 1, 1, 0] and not any(f["speaker"].tolist()[4:])


def test_correlations_find_a_unit_that_tracks_a_feature() -> None:
    torch.manual_seed(0)
    feature = text_features("a line\nanother line here\nand a third\n")["column"]
    acts = torch.randn(len(feature), 10) * 0.01
    acts[:, 6] = 0.5 * feature - 3  # unit 6 counts columns
    acts[:, 2] = -feature  # unit 2 too, with the opposite sign
    r = correlations(acts, feature)
    assert r[6] == pytest.approx(1.0, abs=1e-5) and r[2] == pytest.approx(-1.0, abs=1e-5)
    assert r.abs().max() <= 1.0 + 1e-6
    found = best_units(acts, {"column": feature, "flat": torch.zeros(len(feature))})
    assert {u for u, _ in found["column"][:2]} == {2, 6}
    assert len(found["column"]) == TOP_CORRELATED
    assert found["flat"] == []  # a feature that does not vary has no correlated units
    assert correlations(torch.ones(len(feature), 3), feature).tolist() == [0.0, 0.0, 0.0]
    assert default_units(acts, found)[:2] in ([6, 2], [2, 6])
