"""Rephrasing throughput of the OpenAI-compatible backend against a local stub server.

An LLM server answers each request after a latency the client cannot shorten, so rephrasing
throughput comes from keeping many requests in flight. This measures how close
`OpenAIBackend.generate` gets to that ideal: the stub server (tests/support/openai_server.py,
run as a separate process so it does not share the client's GIL) answers every request after a
fixed --latency, and the backend sends --requests requests at each --concurrency.

Printed, per concurrency:
  docs/s        requests answered per second of wall time (one `generate` call, the HTTP client
                and its connections included)
  ideal docs/s  concurrency / latency: what a client with no overhead at all would get
  efficiency    achieved / ideal
  overhead ms   per request and per slot, the wall time beyond the server latency:
                wall * concurrency / requests - latency
then the client overhead measured directly: latency 0, concurrency 1, wall / requests (an upper
bound: it includes the stub server's own handling and the loopback round trip), and the speedup
of the highest concurrency over concurrency 1.

    python benchmarks/rephrase.py [--requests 400] [--latency 0.05] [--concurrency 1 8 32]
                                  [--repeats 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))  # `dataprep.*`, `tests.*` when run as a script

from dataprep.rephrase.openai_backend import OpenAIBackend  # noqa: E402
from dataprep.rephrase.types import Request, Result  # noqa: E402


@contextmanager
def stub_server(latency: float):
    """The stub server in its own process; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.openai_server", "--port", "0",
                             "--latency", str(latency), "--no-record"],
                            cwd=PROJECT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"stub server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def make_requests(n: int) -> list[Request]:
    text = "The committee reviewed the proposal and agreed to revisit the budget next quarter. "
    return [Request(key=f"bench-{i}", messages=[{"role": "system", "content": "Rewrite as a question and answer."},
                                                {"role": "user", "content": f"[{i}] {text * 4}"}],
                    style="qa", source_text=text) for i in range(n)]


def timed_generate(base_url: str, requests: list[Request], concurrency: int) -> float:
    backend = OpenAIBackend(base_url, model="stub", params={"temperature": 0.7, "max_tokens": 512},
                            concurrency=concurrency, timeout_s=30, max_retries=2, backoff_s=0.05,
                            seed=0, trust_env=False)
    failed: list[Result] = []

    def on_result(i: int, result: Result) -> None:
        if result.status != "ok":
            failed.append(result)

    t0 = time.perf_counter()
    backend.generate(requests, on_result)
    wall = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, e.g. {failed[0].reason}")
    return wall


def best_wall(base_url: str, requests: list[Request], concurrency: int, repeats: int) -> float:
    return min(timed_generate(base_url, requests, concurrency) for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--latency", type=float, default=0.05, help="server latency per request, seconds")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per row")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    if args.latency <= 0:
        parser.error("--latency must be > 0 (the latency-0 overhead run is always done)")

    requests = make_requests(args.requests)
    rows = []
    with stub_server(args.latency) as url:
        timed_generate(url, requests[:16], 4)  # warm-up: imports, first connections
        for c in args.concurrency:
            wall = best_wall(url, requests, c, args.repeats)
            rate = args.requests / wall
            ideal = c / args.latency
            rows.append({"concurrency": c, "wall_s": wall, "docs_per_s": rate, "ideal_docs_per_s": ideal,
                         "efficiency": rate / ideal,
                         "overhead_ms": (wall * c / args.requests - args.latency) * 1000})
    with stub_server(0.0) as url:
        timed_generate(url, requests[:16], 1)
        wall0 = best_wall(url, requests, 1, args.repeats)
    overhead0_ms = wall0 / args.requests * 1000
    first, last = rows[0], rows[-1]
    speedup = last["docs_per_s"] / first["docs_per_s"]

    if args.json:
        print(json.dumps({"requests": args.requests, "latency_s": args.latency, "rows": rows,
                          "overhead_ms_latency0_c1": overhead0_ms,
                          f"speedup_c{last['concurrency']}_vs_c{first['concurrency']}": speedup}, indent=2))
        return 0
    print(f"OpenAIBackend vs stub server: {args.requests} requests, server latency {args.latency * 1000:g} ms, "
          f"best of {args.repeats}")
    print(f"{'concurrency':>11} {'wall s':>8} {'docs/s':>9} {'ideal docs/s':>13} {'efficiency':>11} {'overhead ms':>12}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['wall_s']:>8.2f} {r['docs_per_s']:>9.1f} {r['ideal_docs_per_s']:>13.1f} "
              f"{r['efficiency']:>11.2f} {r['overhead_ms']:>12.2f}")
    print(f"client overhead at latency 0, concurrency 1: {overhead0_ms:.2f} ms/request "
          f"({args.requests / wall0:.0f} docs/s; includes the stub server's handling)")
    print(f"concurrency {last['concurrency']} vs {first['concurrency']}: {speedup:.1f}x docs/s "
          f"(ideal {last['concurrency'] / first['concurrency']:g}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
