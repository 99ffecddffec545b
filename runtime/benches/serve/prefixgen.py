#!/usr/bin/env python3
"""Time to first token of chat requests sharing a ~500-token system prompt (stdlib only): the first
request finds nothing cached (cold), the next --warm ones (other questions) can reuse the system
prompt (warm). One request at a time, temperature 0, max_tokens 1. Prints one JSON line: cold TTFT
and the median warm TTFT (s), and the prompt's length in tokens as the server counted it."""
import argparse, http.client, json, statistics, time

SYSTEM = ("You are the support assistant of a hardware store. Answer briefly and precisely, name the "
          "product family, say when a question needs a specialist, and never guess a price. ") * 14


def ttft(port, question):
    body = json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                       "temperature": 0, "max_tokens": 1, "cache_prompt": True})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t = time.perf_counter()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json", "Cache-Control": "no-cache"})
    r = json.loads(c.getresponse().read())
    dt = time.perf_counter() - t
    c.close()
    return dt, r["usage"]["prompt_tokens"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--warm", type=int, default=8)
    a = ap.parse_args()
    cold, tokens = ttft(a.port, "Question 0: which glue holds wood to metal?")
    warm = [ttft(a.port, f"Question {i}: which screw fits a {i} mm hole?")[0] for i in range(1, a.warm + 1)]
    print(json.dumps({"prompt_tokens": tokens, "cold_s": cold, "warm_s": statistics.median(warm)}))


main()
