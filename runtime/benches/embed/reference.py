"""sentence-transformers (PyTorch) reference for all-MiniLM-L6-v2, as its users run it:
SentenceTransformer(dir).encode(sentences, batch_size=B, normalize_embeddings as the model's
modules say), on CPU with --threads threads.

  reference.py --model DIR vectors --out FILE      writes the sentences of
                                                   runtime/tests/fixtures/embedding-sentences.txt
                                                   and their vectors as JSON (the test fixture)
  reference.py --model DIR bench --sentences FILE  one JSON line: sentences/s at batch 1 and 32,
                                                   p50 latency of one sentence
"""

import argparse, json, os, statistics, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import sentence_transformers
from sentence_transformers import SentenceTransformer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vectors")
    v.add_argument("--sentences", required=True)
    v.add_argument("--out", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--sentences", required=True)
    b.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = SentenceTransformer(args.model, device="cpu")
    model.eval()
    sentences = [l.rstrip("\n") for l in open(args.sentences, encoding="utf-8") if l.strip()]
    if args.cmd == "vectors":
        with torch.inference_mode():
            vecs = model.encode(sentences, batch_size=32, convert_to_numpy=True)
        json.dump(
            {
                "generator": f"sentence-transformers {sentence_transformers.__version__}, "
                f"torch {torch.__version__}, runtime/benches/embed/reference.py",
                "sentences": sentences,
                "vectors": [[float(x) for x in v] for v in vecs],
            },
            open(args.out, "w"),
        )
        return
    out = {"threads": args.threads, "torch": torch.__version__,
           "sentence_transformers": sentence_transformers.__version__}
    with torch.inference_mode():
        model.encode(sentences[:32], batch_size=32)  # warm-up
        for batch in (1, 32):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                chunk = [sentences[(n + i) % len(sentences)] for i in range(batch * 4)]
                model.encode(chunk, batch_size=batch)
                n += len(chunk)
            out[f"batch{batch}_sentences_per_s"] = n / (time.perf_counter() - t0)
        lat = []
        for i in range(200):
            t = time.perf_counter()
            model.encode([sentences[i % len(sentences)]], batch_size=1)
            lat.append(time.perf_counter() - t)
        out["p50_ms"] = statistics.median(lat) * 1e3
    print(json.dumps(out))


if __name__ == "__main__":
    main()
