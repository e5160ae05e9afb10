"""`arfuse serve` under load: 1, 8 and 32 concurrent streaming clients on localhost.

Starts `arfuse serve` (SmolLM2-135M fused with the KJV SLM by default) as a process, then for each
concurrency level C runs C client threads, each streaming ``--requests`` completions one after the
other through the official openai client (greedy, ``ignore_eos``: every stream is exactly
``--max-tokens`` tokens, so the levels do the same work per request). Measured per level:
p50 and p99 time to first token (request sent -> first text), tokens/s per stream (its tokens over
its whole time) and in total (all tokens over the level's wall time), the server's mean batch size,
and failed or lost requests (an exception, a stream without a finish reason, or a token count other
than asked). Checks: zero failed or lost requests; total tokens/s at 8 clients >= 2.5x one client.
Then a client disconnects mid-stream: the time until the server has freed its slot (/health shows
no active row and one more cancelled request) and how many tokens it generated for it.

Bounded: ``--requests`` per client and ``--time-limit`` seconds per level (after it, clients send
no new requests; those in flight finish and count).

Usage (the full run, on a quiet machine):
    python benchmarks/bench_serve.py --large smollm2-135m --small runs/kjv-slm --weight 0.9
A quick check that it runs:
    python benchmarks/bench_serve.py --levels 1,8 --requests 1 --max-tokens 8 --no-write
Prints a table and writes benchmarks/results/bench_serve.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def _pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between order statistics."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _prompts(n: int) -> list[str]:
    """Distinct prompts: lines of benchmarks/prompts_kjv.txt, cycled with a counter when too few."""
    path = HERE / "prompts_kjv.txt"
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()] if path.exists() else []
    lines = lines or ["In the beginning God created the heaven and the earth."]
    return [lines[i % len(lines)] + ("" if i < len(lines) else f" ({i})") for i in range(n)]


def _stream_once(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion; its timings and what came back."""
    t0 = time.perf_counter()
    first = None
    text, finish, usage = [], None, None
    s = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in s:
        if chunk.choices:
            c = chunk.choices[0]
            if c.text and first is None:
                first = time.perf_counter()
            text.append(c.text)
            finish = c.finish_reason or finish
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage.completion_tokens
    t1 = time.perf_counter()
    return {"t0": t0, "ttft": (first or t1) - t0, "seconds": t1 - t0, "tokens": usage, "finish": finish,
            "chars": len("".join(text))}


def run_level(url: str, model: str, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("ARFUSE_API_KEY", "none"), max_retries=0,
                           timeout=max(600.0, time_limit * 2))
    prompts = _prompts(clients * requests)
    results: list[dict] = []
    failures: list[str] = []
    lock = threading.Lock()
    before = _health(url)["stats"]
    start = time.perf_counter()
    deadline = start + time_limit

    def worker(c: int) -> None:
        for r in range(requests):
            if time.perf_counter() > deadline:
                return
            try:
                out = _stream_once(client, model, prompts[c * requests + r], max_tokens)
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                with lock:
                    failures.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                if out["finish"] is None or out["tokens"] != max_tokens:
                    failures.append(f"lost: finish {out['finish']!r}, {out['tokens']} tokens of {max_tokens}")
                results.append(out)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = _health(url)["stats"]
    ttft = [r["ttft"] for r in results]
    per_stream = [r["tokens"] / r["seconds"] for r in results if r["tokens"]]
    tokens = sum(r["tokens"] or 0 for r in results)
    steps = after["steps"] - before["steps"]
    return {"clients": clients, "requests": len(results) + len(failures), "completed": len(results),
            "failed_or_lost": len(failures), "failures": failures[:5], "tokens": tokens, "wall_s": round(wall, 3),
            "ttft_p50_s": round(_pct(ttft, 0.5), 4), "ttft_p99_s": round(_pct(ttft, 0.99), 4),
            "stream_tokens_per_s_p50": round(_pct(per_stream, 0.5), 2),
            "stream_tokens_per_s_mean": round(statistics.fmean(per_stream), 2) if per_stream else 0.0,
            "total_tokens_per_s": round(tokens / wall, 2) if wall > 0 else 0.0,
            "server_steps": steps,
            "server_mean_batch": round((after["row_steps"] - before["row_steps"]) / steps, 2) if steps else 0.0,
            "server_joins": after["joins"] - before["joins"]}


def measure_disconnect(url: str, model: str, max_tokens: int, read_chunks: int = 5) -> dict:
    """A client reads a few chunks of a long stream and hangs up: how soon the slot is free."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("ARFUSE_API_KEY", "none"), max_retries=0)
    before = _health(url)["stats"]
    s = client.completions.create(model=model, prompt=_prompts(1)[0], max_tokens=max_tokens, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    it = iter(s)
    for _ in range(read_chunks):
        next(it)
    active_before = _health(url)["active"]
    t_close = time.perf_counter()
    s.close()
    freed = None
    while time.perf_counter() - t_close < 30:
        h = _health(url)
        if h["active"] == 0 and h["stats"]["cancelled"] == before["cancelled"] + 1:
            freed = time.perf_counter() - t_close
            break
        time.sleep(0.005)
    after = _health(url)["stats"]
    return {"max_tokens": max_tokens, "chunks_read": read_chunks, "active_before_close": active_before,
            "slot_freed": freed is not None, "freed_after_s": round(freed, 4) if freed is not None else None,
            "tokens_generated": after["tokens"] - before["tokens"], "cancelled": after["cancelled"] - before["cancelled"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--large", default="smollm2-135m")
    ap.add_argument("--small", default=str(ROOT / "runs" / "kjv-slm"))
    ap.add_argument("--weight", type=float, default=0.9)
    ap.add_argument("--levels", default="1,8,32", help="concurrent clients per level (default: 1,8,32)")
    ap.add_argument("--requests", type=int, default=2, help="streams per client per level (default: 2)")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per stream (default: 64)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per level before clients stop sending")
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: torch's choice)")
    ap.add_argument("--disconnect-tokens", type=int, default=512, help="max_tokens of the stream that hangs up")
    ap.add_argument("--url", help="an `arfuse serve` already running (its --name must be given with --model)")
    ap.add_argument("--model", help="the model id with --url")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/bench_serve.json")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    model = args.model or "fused"
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "arfuse.cli.main", "serve", "--large", args.large, "--small", args.small,
               "--weight", str(args.weight), "--port", str(port), "--name", model, "--max-batch", str(max(levels)),
               "--max-queue", str(4 * max(levels)), "--max-tokens", str(max(args.max_tokens, args.disconnect_tokens)),
               "--log-level", "warning", "--shutdown-timeout", "5"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        t0 = time.perf_counter()
        while True:
            try:
                _health(url)
                break
            except OSError:
                if proc.poll() is not None:
                    raise SystemExit(f"arfuse serve exited with {proc.returncode}: {' '.join(cmd)}") from None
                if time.perf_counter() - t0 > 600:
                    raise SystemExit("arfuse serve did not start within 600 s") from None
                time.sleep(0.5)
        print(f"server up in {time.perf_counter() - t0:.1f} s: {' '.join(cmd[2:])}", flush=True)
    try:
        run_level(url, model, 1, 1, min(8, args.max_tokens), args.time_limit)   # warm-up: kernels, caches
        rows = []
        for c in levels:
            r = run_level(url, model, c, args.requests, args.max_tokens, args.time_limit)
            rows.append(r)
            print(f"{c:>3} clients: {r['completed']}/{r['requests']} streams, {r['failed_or_lost']} failed or lost; "
                  f"TTFT p50 {r['ttft_p50_s'] * 1000:.0f} ms, p99 {r['ttft_p99_s'] * 1000:.0f} ms; "
                  f"{r['stream_tokens_per_s_p50']:.1f} tokens/s per stream (p50), {r['total_tokens_per_s']:.1f} "
                  f"total; server mean batch {r['server_mean_batch']}, joins {r['server_joins']}", flush=True)
        disc = measure_disconnect(url, model, args.disconnect_tokens)
        freed = f"in {disc['freed_after_s']:.3f} s" if disc["slot_freed"] else "NOT within 30 s"
        print(f"disconnect after {disc['chunks_read']} chunks of a {disc['max_tokens']}-token stream: slot freed "
              f"{freed}, {disc['tokens_generated']} tokens generated for it", flush=True)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    by = {r["clients"]: r for r in rows}
    checks = {"no_failed_or_lost": all(r["failed_or_lost"] == 0 for r in rows),
              "slot_freed_on_disconnect": disc["slot_freed"] and disc["tokens_generated"] < disc["max_tokens"]}
    if 1 in by and 8 in by and by[1]["total_tokens_per_s"] > 0:
        ratio = by[8]["total_tokens_per_s"] / by[1]["total_tokens_per_s"]
        checks["speedup_8_vs_1"] = round(ratio, 2)
        checks["speedup_8_vs_1_at_least_2.5x"] = ratio >= 2.5
    print("checks: " + ", ".join(f"{k} {v}" for k, v in checks.items()))
    out = {"what": "arfuse serve, concurrent streaming clients on localhost (greedy, ignore_eos, openai client)",
           "large": args.large, "small": args.small, "weight": args.weight, "max_tokens": args.max_tokens,
           "requests_per_client": args.requests, "levels": rows, "disconnect": disc, "checks": checks,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    if not args.no_write:
        path = HERE / "results" / "bench_serve.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")
    ok = checks["no_failed_or_lost"] and checks["slot_freed_on_disconnect"] and \
        checks.get("speedup_8_vs_1_at_least_2.5x", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
