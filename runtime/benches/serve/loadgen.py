#!/usr/bin/env python3
"""Streams completions from an OpenAI-compatible server with N concurrent clients (stdlib only).

Every request asks for exactly --max-tokens tokens (ignore_eos, temperature 0), so the token count
is known without trusting the server. Prints one JSON line: aggregate decode tokens/s, request
latency p50/p99 and time-to-first-token p50/p99 (seconds)."""
import argparse, http.client, json, statistics, threading, time


def one(host, port, prompt, max_tokens):
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "n_predict": max_tokens, "cache_prompt": False})
    c = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {r.read()[:200]}")
    ttft = None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        if ttft is None:
            text = json.loads(data)["choices"][0].get("text", "")
            if text:
                ttft = time.perf_counter() - t0
    end = time.perf_counter() - t0
    c.close()
    return ttft if ttft is not None else end, end


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="Write a story about a robot who learns to paint.")
    a = ap.parse_args()
    results, errors = [], []

    def client():
        for _ in range(a.requests_per_client):
            try:
                results.append(one(a.host, a.port, a.prompt, a.max_tokens))
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                errors.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(a.concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} errors, first: {errors[0]}")
    ttfts = [r[0] for r in results]
    lats = [r[1] for r in results]
    print(json.dumps({"concurrency": a.concurrency, "requests": len(results),
                      "tok_s": len(results) * a.max_tokens / wall,
                      "lat_p50": pct(lats, 50), "lat_p99": pct(lats, 99),
                      "ttft_p50": pct(ttfts, 50), "ttft_p99": pct(ttfts, 99),
                      "decode_tok_s_per_stream": statistics.mean(
                          (a.max_tokens - 1) / max(l - f, 1e-9) for f, l in results)}))


if __name__ == "__main__":
    main()
