"""Load for /v1/embeddings: one client on a kept-alive connection, for --seconds per batch size.
Prints one JSON line: sentences/s at batch 1 and 32 and the p50 latency of a one-sentence request."""

import argparse, http.client, json, statistics, time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--sentences", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    sentences = [l.rstrip("\n") for l in open(args.sentences, encoding="utf-8") if l.strip()]
    conn = http.client.HTTPConnection("127.0.0.1", args.port)

    def post(inputs):
        conn.request("POST", "/v1/embeddings", json.dumps({"input": inputs}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        assert r.status == 200, body
        assert len(json.loads(body)["data"]) == len(inputs)

    post(sentences[:32])  # warm-up
    out = {}
    for batch in (1, 32):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            post([sentences[(n + i) % len(sentences)] for i in range(batch)])
            n += batch
        out[f"batch{batch}_sentences_per_s"] = n / (time.perf_counter() - t0)
    lat = []
    for i in range(200):
        t = time.perf_counter()
        post([sentences[i % len(sentences)]])
        lat.append(time.perf_counter() - t)
    out["p50_ms"] = statistics.median(lat) * 1e3
    print(json.dumps(out))


if __name__ == "__main__":
    main()
