#!/usr/bin/env python3
"""A Zipf-distributed mix of chat requests (stdlib only): --requests draws from --unique prompts with
Zipf exponent --zipf (seeded), sent by --concurrency clients at temperature 0. Prints one JSON line:
the share of requests that repeat an earlier one, the server's cache hits (x-anneal-cache: hit),
request latency p50/p99 (s) and requests/s."""
import argparse, http.client, json, random, threading, time


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--unique", type=int, default=1000)
    ap.add_argument("--zipf", type=float, default=0.9)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    weights = [1 / (k + 1) ** a.zipf for k in range(a.unique)]
    picks = rng.choices(range(a.unique), weights=weights, k=a.requests)
    seen, repeats = set(), 0
    for p in picks:
        repeats += p in seen
        seen.add(p)
    work = list(enumerate(picks))
    lock = threading.Lock()
    latencies, hits, errors = [], 0, []

    def client():
        nonlocal hits
        while True:
            with lock:
                if not work:
                    return
                _, p = work.pop(0)
            body = json.dumps({"messages": [{"role": "user", "content": f"Question {p}: what is {p % 97} plus {p % 89}?"}],
                               "temperature": 0, "max_tokens": a.max_tokens})
            c = http.client.HTTPConnection("127.0.0.1", a.port, timeout=600)
            t = time.perf_counter()
            c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            dt = time.perf_counter() - t
            c.close()
            with lock:
                if r.status != 200:
                    errors.append(r.status)
                latencies.append(dt)
                hits += r.getheader("x-anneal-cache") == "hit"

    threads = [threading.Thread(target=client) for _ in range(a.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(json.dumps({"requests": a.requests, "repeat_share": repeats / a.requests, "hits": hits,
                      "hit_rate": hits / a.requests, "p50_s": pct(latencies, 50), "p99_s": pct(latencies, 99),
                      "req_per_s": a.requests / wall, "errors": errors}))


main()
