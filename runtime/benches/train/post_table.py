"""The speed table of post-bench.sh: one line per row on stdin, `name|load|anneal JSON|PyTorch JSON`
(train-post speed, finetune_reference.py). Medians over the steps after the first; tokens/s is
the sum of their tokens over the sum of their seconds."""

import json, sys

batch, steps = sys.argv[1], sys.argv[2]


def med(xs):
    xs = sorted(xs[1:])
    return xs[len(xs) // 2] if xs else None


def fmt(v, f, none="not yet"):
    return none if v is None else format(v, f)


print(f"\nSmolLM2-135M-Instruct, {batch} sequences per step, {steps} steps (figures over steps 2..{steps})")
head = ["row", "anneal tok/s", "PyTorch tok/s", "ratio", "anneal s/step", "PyTorch s/step",
        "anneal CPU s/step", "PyTorch CPU s/step", "anneal peak RSS", "PyTorch peak RSS", "trainable (anneal/PyTorch)", "load 1/5/15 min before -> after"]
print("| " + " | ".join(head) + " |")
print("|" + " --- |" * len(head))
for line in sys.stdin:
    name, loads, a, p = line.rstrip("\n").split("|")
    a, p = json.loads(a), json.loads(p)
    at = a.get("tokens_per_sec")
    ratio = at / p["tokens_per_sec"] if at else None
    cells = [
        name, fmt(at, ".0f"), f"{p['tokens_per_sec']:.0f}", fmt(ratio, ".2f"),
        fmt(a.get("step_secs") and med(a["step_secs"]), ".2f"), f"{med(p['step_secs']):.2f}",
        fmt(a.get("step_cpu_secs") and med(a["step_cpu_secs"]), ".2f"), f"{med(p['step_cpu_secs']):.2f}",
        fmt(a.get("peak_rss_mib"), ".0f") + (" MiB" if at else ""), f"{p['peak_rss_mib']:.0f} MiB",
        f"{fmt(a.get('trainable') and a['trainable'] / 1e6, '.2f', '-')}M / {p['trainable'] / 1e6:.2f}M", loads,
    ]
    print("| " + " | ".join(cells) + " |")
    print(f"    {name}: losses anneal {[round(x, 4) for x in a.get('losses', [])]}, PyTorch {[round(x, 4) for x in p['losses']]}; "
          f"tokens per step {p['tokens']}; PyTorch RSS after loading {p['rss_after_load_mib']:.0f} MiB", file=sys.stderr)
