"""Generated sections of the README and the docs pages, between `<!-- name:start -->` and `<!-- name:end -->` markers.

`python -m app.tools.readme` rewrites the sections made from the code and the shipped files (the settings
table, the README's model and benchmark tables); `--check` only says which ones are stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# where `rnnserve bench/loadtest/report --docs` write their sections by default
PERFORMANCE_PAGE = DOCS / "performance.md"
OPERATIONS_PAGE = DOCS / "operations.md"
MODELS_PAGE = DOCS / "models.md"
CONFIGURATION_PAGE = DOCS / "configuration.md"
BENCH_JSON = DOCS / "bench.json"
README_MODELS = ("shakespeare-lstm", "shakespeare-gru", "shakespeare-rnn", "python-lstm")


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"no {start} ... {end} section")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def read_section(text: str, name: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def write_section(path: Path, name: str, body: str) -> None:
    path.write_text(replace_section(path.read_text(), name, body))


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def settings_table() -> str:
    """One row per field of Settings: its variable, default and description."""
    from app.config import Settings

    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `RNNSERVE_{name.upper()}` | {_default(field)} | {description} |")
    return "\n".join(rows)


def _bench(bench: dict[str, Any], mode: str, model: str) -> dict[str, Any] | None:
    return next((r for r in bench.get("http", []) if r["mode"] == mode and r["model"] == model), None)


def readme_models(models_dir: Path, bench: dict[str, Any]) -> str:
    """The README's model table: one line per model, with its served single-stream speed from the benchmark."""
    from app.config import Settings

    default = Settings.model_fields["default_model"].default
    rows = [
        "| model | cell | layers x hidden | parameters | val bits/char | test bits/char | served chars/s, 1 stream |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name in README_MODELS:
        if not (models_dir / name / "meta.json").exists():
            continue
        meta = json.loads((models_dir / name / "meta.json").read_text())
        config = json.loads((models_dir / name / "config.json").read_text())
        m, t = meta.get("metrics", {}), meta.get("training", {})
        served = _bench(bench, "batched", name)
        speed = f"{served['single_chars_per_s']:,.0f}" if served else "-"
        label = f"{name} (default)" if name == default else name
        rows.append(
            f"| {label} | {config['arch']} | {config['num_layers']} x {config['hidden_size']} "
            f"| {t.get('parameters', 0):,} | {m.get('val_bits_per_char', float('nan')):.3f} "
            f"| {m.get('test_bits_per_char', float('nan')):.3f} | {speed} |"
        )
    return "\n".join(rows)


def _times(ours: float, naive: float, higher_is_better: bool) -> str:
    """How many times better rnnserve is: chars/s over the naive's, or the naive's latency over ours."""
    ratio = ours / naive if higher_is_better else naive / ours
    return f"{ratio:,.1f}x" if ratio < 10 else f"{ratio:,.0f}x"


def readme_bench(bench: dict[str, Any]) -> str:
    """The README's headline benchmark: rnnserve against the naive baseline, a row per model."""
    rows = [
        "| model | single stream chars/s | 128 streams chars/s | first char p50 ms, 128 streams "
        "| continue after 100,000 chars, ms |",
        "|---|---:|---:|---:|---:|",
    ]
    models = list(dict.fromkeys(r["model"] for r in bench.get("http", [])))
    for model in models:
        ours, naive = _bench(bench, "batched", model), _bench(bench, "naive", model)
        if ours is None or naive is None:
            continue
        cells = [
            (ours["single_chars_per_s"], naive["single_chars_per_s"]),
            (ours["aggregate_chars_per_s"].get("128"), naive["aggregate_chars_per_s"].get("128")),
            (ours["ttfc_ms"].get("128", [None])[0], naive["ttfc_ms"].get("128", [None])[0]),
            (ours["continuation_ms"].get("100000"), naive["continuation_ms"].get("100000")),
        ]
        shown = ["-" if a is None or b is None else f"{a:,.0f} (naive {b:,.0f}, {_times(a, b, i < 2)})"
                 for i, (a, b) in enumerate(cells)]  # fmt: skip
        rows.append(f"| {model} | " + " | ".join(shown) + " |")
    return "\n".join(rows)


def generated(models_dir: Path = ROOT / "models", bench_json: Path = BENCH_JSON) -> dict[tuple[Path, str], str]:
    """Every section made from the code and the shipped files: (file, section name) -> body."""
    bench = json.loads(bench_json.read_text()) if bench_json.exists() else {}
    return {
        (CONFIGURATION_PAGE, "settings"): settings_table(),
        (README, "readme-models"): readme_models(models_dir, bench),
        (README, "readme-bench"): readme_bench(bench),
    }


def stale() -> list[str]:
    return [
        f"{path.relative_to(ROOT)}: {name}"
        for (path, name), body in generated().items()
        if read_section(path.read_text(), name) != body
    ]


def refresh() -> None:
    for (path, name), body in generated().items():
        write_section(path, name, body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m app.tools.readme", description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 if a generated section is stale; write nothing")
    args = p.parse_args(argv)
    if not args.check:
        refresh()
        return
    if problems := stale():
        sys.exit("stale generated sections (run `python -m app.tools.readme`): " + ", ".join(problems))


if __name__ == "__main__":
    main()
