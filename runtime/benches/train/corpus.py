"""Writes the training benchmarks' deterministic text to argv[1]: paragraphs of arithmetic facts
(~1.5 MB), the same bytes on every run."""
import random
import sys

r = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(20000):
        f.write("\n".join(f"{a}+{b}={a+b}" for a, b in ((r.randrange(1000), r.randrange(1000)) for _ in range(8))))
        f.write("\n\n")
