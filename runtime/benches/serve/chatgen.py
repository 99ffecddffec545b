#!/usr/bin/env python3
"""Multi-turn chat load (stdlib only): --clients conversations at once, each --turns turns; every turn
resends the whole history (system prompt, earlier questions and the server's own answers) plus a new
question, temperature 0, --max-tokens tokens. Prints one JSON line: turns/s, generated tokens/s, prompt
tokens per turn (mean, as the server counted them), median TTFT-free turn latency (s), errors."""
import argparse, http.client, json, statistics, threading, time

SYSTEM = "You are a concise assistant for a hardware store. Answer in one or two sentences."
QUESTIONS = ["Which glue holds wood to metal?", "And how long does it take to set?",
             "Can I paint over it afterwards?", "Which brush should I use for that paint?",
             "How do I clean the brush?", "Is the cleaner safe indoors?"]


def conversation(port, turns, max_tokens, client, out):
    history = [{"role": "system", "content": SYSTEM}]
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    for t in range(turns):
        history.append({"role": "user", "content": f"(customer {client}) {QUESTIONS[t % len(QUESTIONS)]}"})
        body = json.dumps({"messages": history, "temperature": 0, "max_tokens": max_tokens,
                           "ignore_eos": True, "cache_prompt": True})
        start = time.perf_counter()
        try:
            c.request("POST", "/v1/chat/completions", body,
                      {"Content-Type": "application/json", "Cache-Control": "no-cache"})
            r = c.getresponse()
            data = json.loads(r.read())
            if r.status != 200:
                out["errors"].append(data)
                return
        except Exception as e:  # noqa: BLE001 - recorded and reported
            out["errors"].append(str(e))
            return
        out["latency"].append(time.perf_counter() - start)
        out["prompt_tokens"].append(data["usage"]["prompt_tokens"])
        out["generated"] += data["usage"]["completion_tokens"]
        history.append({"role": "assistant", "content": data["choices"][0]["message"]["content"]})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    out = {"latency": [], "prompt_tokens": [], "generated": 0, "errors": []}
    t0 = time.perf_counter()
    threads = [threading.Thread(target=conversation, args=(a.port, a.turns, a.max_tokens, i, out))
               for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    turns = len(out["latency"])
    print(json.dumps({
        "clients": a.clients, "turns": turns, "turns_per_s": turns / wall,
        "generated_per_s": out["generated"] / wall,
        "prompt_tokens_mean": statistics.mean(out["prompt_tokens"]) if turns else 0,
        "p50_s": statistics.median(out["latency"]) if turns else 0,
        "errors": out["errors"][:3],
    }))


if __name__ == "__main__":
    main()
