"""The session record codec: SessionRecord bytes, recurrent states and sampler generator states."""

from __future__ import annotations

import json

import pytest
import torch

from app.nn import CharRNN, ModelConfig
from app.sessions.record import (
    MAGIC,
    TAIL_CHARS,
    SessionRecord,
    decode_state,
    encode_state,
    generator_bytes,
    generator_tensor,
)


def make_record(**overrides: object) -> SessionRecord:
    gen = torch.Generator().manual_seed(7)
    fields: dict[str, object] = {
        "session_id": "sess-abc",
        "owner": "0123456789abcdef0123456789abcdef",
        "model": "tiny-lstm",
        "model_sha256": "f" * 64,
        "state": encode_state((torch.randn(2, 1, 16), torch.randn(2, 1, 16))),
        "last": "é",  # a non-ASCII last character survives the JSON header
        "generator_state": generator_bytes(gen.get_state()),
        "seed": 2**62 + 3,
        "chars": 1234,
        "tail": "x" * (TAIL_CHARS - 2) + '\n"',
        "created_at": 1_700_000_000.123456,
        "updated_at": 1_700_000_100.654321,
        "expires_at": 1_700_086_500.654321,
        "version": 7,
        **overrides,
    }
    return SessionRecord(**fields)  # type: ignore[arg-type]


def with_header(header: object, body: bytes = b"") -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + len(head).to_bytes(4, "little") + head + body


def test_record_round_trips_through_bytes() -> None:
    record = make_record()
    blob = record.to_bytes()
    assert blob.startswith(MAGIC)
    back = SessionRecord.from_bytes(blob)
    assert back == record
    assert back.to_bytes() == blob


def test_record_with_empty_state_and_tail_round_trips() -> None:
    record = make_record(state=b"", generator_state=b"", tail="", chars=0, version=1)
    assert SessionRecord.from_bytes(record.to_bytes()) == record


def test_evolve_changes_only_the_named_fields() -> None:
    record = make_record()
    later = record.evolve(version=8, chars=1300)
    assert (later.version, later.chars) == (8, 1300)
    assert later.evolve(version=7, chars=1234) == record


def _corruptions() -> list[tuple[str, bytes]]:
    blob = make_record().to_bytes()
    n = int.from_bytes(blob[4:8], "little")
    header = json.loads(blob[8 : 8 + n])
    missing = {k: v for k, v in header.items() if k != "chars"}
    unknown = {**header, "colour": "blue"}
    bad_sizes = {**header, "sizes": 5}
    return [
        ("empty", b""),
        ("magic only", MAGIC),
        ("wrong magic", b"XXXX" + blob[4:]),
        ("truncated body", blob[:-1]),
        ("one byte too many", blob + b"\0"),
        ("truncated header", blob[: 8 + n // 2]),
        ("header length past the end", blob[:4] + (10**6).to_bytes(4, "little") + blob[8:]),
        ("header not JSON", MAGIC + (4).to_bytes(4, "little") + b"{{{{"),
        ("header not UTF-8", MAGIC + (2).to_bytes(4, "little") + b"\xff\xfe"),
        ("header missing a field", with_header(missing, blob[8 + n :])),
        ("header with an unknown field", with_header(unknown, blob[8 + n :])),
        ("sizes not a pair", with_header(bad_sizes, blob[8 + n :])),
        ("header a list", with_header([1, 2])),
    ]


@pytest.mark.parametrize(("name", "blob"), _corruptions(), ids=[name for name, _ in _corruptions()])
def test_corrupt_or_truncated_records_raise_value_error(name: str, blob: bytes) -> None:
    with pytest.raises(ValueError, match=r"corrupt session record|bad magic"):
        SessionRecord.from_bytes(blob)


@pytest.mark.parametrize("header", ["a string", 42, None], ids=["string", "number", "null"])
def test_a_header_that_is_not_a_json_object_raises_value_error(header: object) -> None:
    with pytest.raises(ValueError, match="corrupt session record"):
        SessionRecord.from_bytes(with_header(header))


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_state_round_trips_for_every_cell(arch: str) -> None:
    torch.manual_seed(0)
    h = torch.randn(2, 1, 16)
    state = (h, torch.randn(2, 1, 16)) if arch == "lstm" else h
    back = decode_state(encode_state(state), arch, num_layers=2, hidden_size=16)
    if arch == "lstm":
        assert isinstance(back, tuple) and len(back) == 2
        assert torch.equal(back[0], state[0]) and torch.equal(back[1], state[1])
    else:
        assert isinstance(back, torch.Tensor)
        assert torch.equal(back, h)


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_a_real_models_state_round_trips_and_goes_on_identically(arch: str) -> None:
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(arch=arch, vocab_size=10, embedding_size=4, hidden_size=8, num_layers=2)).eval()
    ids = torch.tensor([[1], [2], [3], [4]])  # (T, B)
    with torch.no_grad():
        _, state = model(ids[:2], None)
        restored = decode_state(encode_state(state), arch, 2, 8)
        expected, _ = model(ids[2:], state)
        got, _ = model(ids[2:], restored)
    assert torch.equal(got, expected)


def test_a_non_contiguous_state_is_encoded() -> None:
    t = torch.randn(16, 1, 2).transpose(0, 2)  # (2, 1, 16), not contiguous
    assert not t.is_contiguous()
    assert torch.equal(decode_state(encode_state(t), "gru", 2, 16), t)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("state", "arch", "match"),
    [
        (torch.zeros(2, 1, 16), "lstm", "expected"),  # an LSTM state needs c
        ((torch.zeros(2, 1, 16), torch.zeros(2, 1, 16)), "gru", "expected"),  # a GRU state has no c
        (torch.zeros(1, 1, 16), "rnn", r"\(1, 1, 16\)"),  # wrong layer count
        (torch.zeros(2, 1, 32), "rnn", r"\(2, 1, 32\)"),  # wrong hidden size
        (torch.zeros(2, 3, 16), "gru", r"\(2, 3, 16\)"),  # batch is not 1
        (torch.zeros(2, 1, 16, dtype=torch.float64), "rnn", "float64"),
        (torch.zeros(2, 1, 16, dtype=torch.float16), "gru", "float16"),
        ((torch.zeros(2, 1, 16), torch.zeros(2, 1, 16, dtype=torch.float64)), "lstm", "float64"),
        ((torch.zeros(2, 1, 16), torch.zeros(2, 1, 8)), "lstm", r"\(2, 1, 8\)"),
    ],
    ids=["lstm-without-c", "gru-with-c", "layers", "hidden", "batch", "f64", "f16", "lstm-c-f64", "lstm-c-shape"],
)
def test_a_state_of_the_wrong_shape_or_dtype_is_refused(state: object, arch: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_state(encode_state(state), arch, num_layers=2, hidden_size=16)  # type: ignore[arg-type]


@pytest.mark.parametrize("blob", [b"", b"garbage-garbage-garbage", "truncated"], ids=["empty", "garbage", "truncated"])
def test_corrupt_state_bytes_are_refused_with_value_error(blob: bytes | str) -> None:
    if blob == "truncated":
        blob = encode_state(torch.zeros(2, 1, 16))[:-3]
    with pytest.raises(ValueError):
        decode_state(blob, "gru", 2, 16)  # type: ignore[arg-type]


def test_generator_state_round_trips_and_continues_the_same_stream() -> None:
    gen = torch.Generator().manual_seed(1234)
    torch.rand(5, generator=gen)  # advance it somewhere
    blob = generator_bytes(gen.get_state())
    assert isinstance(blob, bytes)
    expected = torch.rand(8, generator=gen)
    other = torch.Generator().manual_seed(999)
    other.set_state(generator_tensor(blob))
    assert torch.equal(torch.rand(8, generator=other), expected)
