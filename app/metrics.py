"""Prometheus metrics of the service: HTTP, engine, streams and the session store."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("rnnserve_requests_total", "HTTP requests by route and status", ["method", "route", "status"])
REQUEST_SECONDS = Histogram(
    "rnnserve_request_seconds", "HTTP request time to the response head", ["route"], buckets=LATENCY_BUCKETS
)
TTFC = Histogram(
    "rnnserve_time_to_first_char_seconds", "From admission to the first character", ["model"], buckets=LATENCY_BUCKETS
)
INTER_CHAR = Histogram(
    "rnnserve_inter_char_seconds", "Time between characters of one stream", ["model"], buckets=LATENCY_BUCKETS
)
CHARS = Counter("rnnserve_generated_chars_total", "Characters generated", ["model"])
ACTIVE = Gauge("rnnserve_active_generations", "Generations admitted and not finished", ["model"])
QUEUE = Gauge("rnnserve_queue_depth", "Generations waiting for a slot", ["model"])
BATCH = Histogram(
    "rnnserve_batch_size", "Rows advanced per engine step", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
# the compute thread's time in engine trips, by phase: prefill, the decoding step's kernel ("step"),
# choosing characters (sampling, stop strings, logprobs) and the rest of a trip (batch bookkeeping)
ENGINE_SECONDS = Counter("rnnserve_engine_seconds_total", "Compute-thread time in engine trips", ["model", "phase"])
PHASES = ("prefill", "step", "choose", "bookkeeping")
# the CPUs this process may use, to which its torch and ONNX Runtime thread pools are sized (app.cpus)
CPU_BUDGET = Gauge("rnnserve_cpu_budget", "CPUs this process may use, by where the figure comes from", ["source"])
SESSIONS = Counter("rnnserve_session_ops_total", "Session store outcomes", ["outcome"])  # hit|miss|conflict|error
STATE_BYTES = Histogram(
    "rnnserve_session_state_bytes", "Size of stored session records", buckets=(1e3, 4e3, 16e3, 64e3, 256e3, 1e6)
)
