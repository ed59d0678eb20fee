"""StopChecker: stop strings across chunk boundaries, several candidates, and what is held back."""

from __future__ import annotations

import random

import pytest

from app.engine.stopping import StopChecker


def run(stops: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    """Push `chunks` until a stop: (emitted text incl. flush when not stopped, stopped, emitted pieces)."""
    checker = StopChecker(stops)
    pieces: list[str] = []
    for chunk in chunks:
        out, stopped = checker.push(chunk)
        pieces.append(out)
        if stopped:
            return "".join(pieces), True, pieces
    pieces.append(checker.flush())
    return "".join(pieces), False, pieces


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    """The text one char at a time, whole, and a few uneven random splits."""
    rng = random.Random(seed)
    out = [list(text), [text]]
    for _ in range(4):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 5))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def by_char_reference(stops: list[str], text: str) -> tuple[str, bool]:
    """What generating `text` one character at a time must give: cut where a stop first completes."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if s and text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


@pytest.mark.parametrize(
    "chunks",
    [
        list("hello STOP world"),
        ["hello ST", "OP world"],
        ["hel", "lo S", "T", "OP w", "orld"],
        ["hello S", "TO", "P"],
        ["hello STOP world"],
    ],
)
def test_stop_string_spanning_chunks(chunks: list[str]) -> None:
    assert run(["STOP"], chunks)[:2] == ("hello ", True)


def test_earliest_occurrence_of_several_stops_wins() -> None:
    for chunks in chunkings("hello world, said he", seed=1):
        assert run(["world", "lo", "said"], chunks)[:2] == ("hel", True)
        assert run(["said", "world"], chunks)[:2] == ("hello ", True)


@pytest.mark.parametrize("stops", [["ab", "abc"], ["abc", "ab"]])
def test_stop_that_is_a_prefix_of_another(stops: list[str]) -> None:
    for chunks in chunkings("xxabcd", seed=2):
        assert run(stops, chunks)[:2] == ("xx", True)


def test_longer_stop_containing_a_shorter_one_one_char_at_a_time() -> None:
    # "b" completes before "abc" can: generation ends after "xxa"
    assert run(["abc", "b"], list("xxabcd"))[:2] == ("xxa", True)
    assert run(["abc", "b"], ["x", "xab", "cd"])[:2] == ("xxa", True)


@pytest.mark.parametrize("chunks", [["xxabcd"], ["xx", "abcd"], ["xxa", "bcd"]])
def test_stop_result_does_not_depend_on_chunking_when_a_stop_contains_another(chunks: list[str]) -> None:
    # a chunk holding all of "abc" must still stop where "b" completes, as char by char
    assert run(["abc", "b"], chunks)[:2] == run(["abc", "b"], list("xxabcd"))[:2] == ("xxa", True)


@pytest.mark.parametrize("seed", range(6))
def test_any_chunking_gives_the_one_char_at_a_time_result(seed: int) -> None:
    rng = random.Random(200 + seed)

    def pick(n: int) -> str:
        return "".join(rng.choice("ab c") for _ in range(n))

    for _ in range(40):
        long = pick(rng.randint(2, 5))
        i = rng.randrange(len(long))
        inner = long[i : rng.randint(i + 1, len(long))]  # a stop inside another one
        text = pick(rng.randint(0, 12)) + long + pick(rng.randint(1, 12))
        stops = [long, inner, pick(rng.randint(1, 3))]
        rng.shuffle(stops)
        expected = by_char_reference(stops, text)
        for chunks in chunkings(text, seed):
            assert run(stops, chunks)[:2] == expected, (stops, chunks)


@pytest.mark.parametrize("seed", range(6))
def test_one_char_at_a_time_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(60):
        text = "".join(rng.choice("ab c") for _ in range(rng.randint(1, 30)))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        assert run(stops, list(text))[:2] == by_char_reference(stops, text), (stops, text)


@pytest.mark.parametrize("seed", range(6))
def test_emitted_text_never_holds_any_part_of_a_later_stop(seed: int) -> None:
    rng = random.Random(100 + seed)
    for _ in range(60):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(1, 30)))
        stops = ["".join(rng.choice("abc ") for _ in range(rng.randint(2, 4)))]
        final, stopped = by_char_reference(stops, text)
        for chunks in chunkings(text, seed):
            emitted, got_stop, pieces = run(stops, chunks)
            assert (emitted, got_stop) == (final, stopped), (stops, chunks)
            # at every point, what has been emitted is a prefix of the final text: no character
            # of the stop string was ever released early
            so_far = ""
            for piece in pieces:
                so_far += piece
                assert final.startswith(so_far), (stops, chunks, so_far)


def test_flush_returns_what_is_held_back_when_nothing_stops() -> None:
    checker = StopChecker(["xyz"])
    assert checker.push("hello") == ("hel", False)
    assert checker.flush() == "lo"
    assert checker.flush() == ""


@pytest.mark.parametrize("seed", range(4))
def test_pieces_and_flush_concatenate_to_the_input_when_nothing_stops(seed: int) -> None:
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"
    for stops in (["zz"], ["Q", "xyzzy"], [], ["questions"]):
        for chunks in chunkings(text, seed):
            emitted, stopped, _ = run(stops, chunks)
            assert not stopped
            assert emitted == text


@pytest.mark.parametrize("stops", [["abcd"], ["a", "abcd"], ["abcd", "xy", "q"], ["\n\n\n\n"]])
def test_holds_back_at_most_longest_stop_minus_one(stops: list[str]) -> None:
    hold = max(len(s) for s in stops) - 1
    checker = StopChecker(stops)
    pushed = ""
    emitted = ""
    for ch in "the wretched rhyme":
        out, stopped = checker.push(ch)
        assert not stopped
        pushed += ch
        emitted += out
        assert len(pushed) - len(emitted) <= hold
    assert emitted + checker.flush() == pushed


def test_no_stops_holds_nothing_and_empty_stops_are_ignored() -> None:
    for stops in ([], [""], ["", ""]):
        checker = StopChecker(stops)
        assert checker.push("abc") == ("abc", False)
        assert checker.push("d") == ("d", False)
        assert checker.flush() == ""


def test_stop_at_the_very_start() -> None:
    assert run(["Th"], list("The end"))[:2] == ("", True)
    assert run(["Th"], ["The end"])[:2] == ("", True)
