#!/usr/bin/env python3
"""The GPU benchmark of anneal-runtime (run.sh prepares the binary and libraries, then runs this).

Measures, in one run and on one device:
  1. correctness of training: the loss of the first steps of a small model on the GPU (bf16
     compute, f32 master weights) against the CPU's f32 curve recorded in cpu_reference.json;
  2. training throughput: tokens/s and MFU of a ~125M-parameter model (RMSNorm, RoPE, GQA,
     SwiGLU), anneal side by side with PyTorch eager (../train/reference.py, autocast bf16) on the
     same architecture, batch, context and data;
  3. serving: prefill and single-stream decode tokens/s, aggregate decode tokens/s at 1/16/64
     streams (../serve/loadgen.py), and the greedy text for a fixed prompt against the CPU's.
Prints a markdown table and writes results.json (and the logs) into --out.

Standard library only; PyTorch is used through reference.py in its own process. --quick shrinks
every size so that the whole run takes a minute or two on a CPU (the dry run of run.sh).
--write-reference runs only what cpu_reference.json holds, on the CPU, and writes it."""

import argparse, json, os, socket, subprocess, sys, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = os.path.dirname(HERE)

# Dense bf16 peak of an H100/H200 SXM by the vendor's datasheet (MFU's denominator). Override
# with --peak-tflops; the measured ceiling of an 8192^3 bf16 matmul here was about 790.
H200_BF16_TFLOPS = 989.4
# HBM3e bandwidth of the H200 by the datasheet (the decode bandwidth limit's denominator).
H200_TBPS = 4.8
# SmolLM2 is served with its Q4_1 weights as stored (--q4-1 keep, on the CPU and the GPU alike):
# a decode step reads every weight once (the tied head included; the embedding lookup reads one
# row), i.e. about the GGUF file's size. That over the memory bandwidth is the decode limit.

# The correctness model: small enough for the CPU reference to be computed in seconds.
CHECK = dict(name="check", hidden=128, layers=4, heads=4, kv_heads=2, inter=352, ctx=256,
             vocab=0, batch=8, steps=20, lr=1e-3, warmup=2)
# ~125M parameters, GPT-2-small-like widths with a 32k vocabulary (untied head).
BIG = dict(name="125M", hidden=768, layers=12, heads=12, kv_heads=4, inter=2048, ctx=1024,
           vocab=32768, batch=16, steps=12, lr=3e-4, warmup=2)
QUICK = dict(name="quick", hidden=64, layers=2, heads=4, kv_heads=2, inter=160, ctx=128,
             vocab=512, batch=4, steps=4, lr=1e-3, warmup=2)
SKIP = 2  # steps left out of tokens/s: the first ones load kernels and allocate

# Greedy-text check: prompt and length (the reference holds the CPU's text for these).
GREEDY_PROMPT = "The three primary colors are"
GREEDY_TOKENS = 32


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def corpus(path):
    """Deterministic text (paragraphs of sums), as ../train/bench.sh writes it."""
    import random
    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(20000):
            f.write("\n".join(f"{a}+{b}={a+b}" for a, b in
                              ((r.randrange(1000), r.randrange(1000)) for _ in range(8))))
            f.write("\n\n")


def params_of(c, vocab):
    h, hd = c["hidden"], c["hidden"] // c["heads"]
    per_layer = 2 * h * h + 2 * h * c["kv_heads"] * hd + 3 * h * c["inter"] + 2 * h
    return {"total": c["layers"] * per_layer + 2 * vocab * h + h, "embedding": vocab * h}


def train_flops_per_token(c, vocab):
    """6 x (parameters that multiply: all but the embedding lookup) + attention's 12 * L * h * T
    (fwd + bwd, scores and values, causal half not subtracted: PaLM's MFU convention)."""
    p = params_of(c, vocab)
    return 6 * (p["total"] - p["embedding"]) + 12 * c["layers"] * c["hidden"] * c["ctx"]


def anneal_train(a, c, work, device, precision="auto"):
    """Trains config c with anneal; returns per-step losses and tokens/s after SKIP steps."""
    name = f"{c['name']}-{precision}"
    cfg = os.path.join(work, f"train-{name}.yaml")
    vocab = f", vocabSize: {c['vocab']}" if c["vocab"] else ""
    with open(cfg, "w") as f:
        f.write(f"""model:
  architecture: {{hiddenSize: {c['hidden']}, nLayers: {c['layers']}, nHeads: {c['heads']}, nKvHeads: {c['kv_heads']}, intermediateSize: {c['inter']}, maxSeqLen: {c['ctx']}{vocab}}}
dataset: {{uri: "file://{work}/corpus.txt"}}
stage: pretrain
hyperparameters: {{steps: {c['steps']}, batchSize: {c['batch']}, seqLen: {c['ctx']}, learningRate: {c['lr']}, warmupSteps: {c['warmup']},
                  threads: {a.threads}, logEvery: 1, seed: 0, precision: {precision}}}
output: {{path: "{work}/model-{name}"}}
""")
    t0 = time.time()
    p = subprocess.run([a.bin, "train", "--config", cfg, "--device", device],
                       capture_output=True, text=True, timeout=a.step_timeout)
    with open(os.path.join(a.out, f"anneal-train-{name}.log"), "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"anneal train exited {p.returncode}: {p.stderr.strip()[-800:]}")
    steps = [json.loads(l) for l in p.stdout.splitlines() if '"event":"step"' in l]
    timed = steps[SKIP:] or steps[-1:]
    # Harmonic mean: every step processes the same number of tokens.
    tps = len(timed) / sum(1 / s["tokens_per_sec"] for s in timed)
    return {"losses": [s["loss"] for s in steps], "tokens_per_sec": tps,
            "wall_s": round(time.time() - t0, 1), "model_dir": f"{work}/model-{name}"}


def torch_train(a, c, work, device):
    if not a.python_torch:
        return None
    cmd = [a.python_torch, os.path.join(BENCHES, "train", "reference.py"), "--data",
           f"{work}/corpus.txt", "--hidden", c["hidden"], "--layers", c["layers"], "--heads",
           c["heads"], "--kv-heads", c["kv_heads"], "--inter", c["inter"], "--ctx", c["ctx"],
           "--batch", c["batch"], "--steps", c["steps"], "--warmup", c["warmup"], "--lr", c["lr"],
           "--threads", a.threads, "--skip", SKIP, "--device", "cuda" if "cuda" in device else "cpu",
           "--dtype", "bf16" if "cuda" in device else "fp32", "--vocab", c["vocab"] or 258]
    p = subprocess.run([str(x) for x in cmd], capture_output=True, text=True,
                       timeout=a.step_timeout)
    with open(os.path.join(a.out, f"torch-train-{c['name']}.log"), "w") as f:
        f.write(p.stdout + p.stderr)
    if p.returncode != 0:
        log(f"PyTorch reference failed ({p.returncode}): {p.stderr.strip()[-400:]}")
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def post(port, body, timeout=600):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, a, model, device, max_batch, q41):
        self.port = free_port()
        self.logf = open(os.path.join(a.out, f"anneal-serve-{q41}.log"), "w")
        cmd = [a.bin, "serve", "--model", model, "--listen", f"127.0.0.1:{self.port}",
               "--device", device, "--max-batch", str(max_batch), "--max-queue", "512",
               "--max-seq-len", str(a.serve_ctx), "--threads", str(a.threads), "--q4-1", q41]
        self.p = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"anneal serve exited {self.p.returncode} (see anneal-serve.log)")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2)
                return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError("anneal serve not ready in 180 s")

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.logf.close()


def greedy(port):
    r = post(port, {"prompt": GREEDY_PROMPT, "max_tokens": GREEDY_TOKENS, "temperature": 0})
    return r["choices"][0]["text"]


def loadgen(a, port, streams, tokens, per_client):
    p = subprocess.run([sys.executable, os.path.join(BENCHES, "serve", "loadgen.py"), "--port",
                        str(port), "--concurrency", str(streams), "--requests-per-client",
                        str(per_client), "--max-tokens", str(tokens)],
                       capture_output=True, text=True, timeout=a.step_timeout)
    if p.returncode != 0:
        raise RuntimeError(f"loadgen: {p.stderr.strip()[-400:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def serve_greedy(a, model, device, res):
    """The greedy text with the weights dequantized to f32 (`--q4-1 f32`): quantized kernels
    quantize activations differently on each device (candle's CPU and GPU Q4_1 kernels use 8-bit
    activations, anneal's CPU kernels do not) and 32 greedy tokens of a 135M model do not survive
    that, while the same exact weights in f32 must give the same text unless the model is wrong."""
    srv = Server(a, model, device, 4, "f32")
    try:
        res["greedy_text"] = greedy(srv.port)
    finally:
        srv.stop()


def serve_bench(a, model, device, res):
    srv = Server(a, model, device, max(a.streams), "keep")
    try:
        loadgen(a, srv.port, 1, 8, 1)  # warm-up: kernels load, caches allocate
        res["greedy_text_q4_1"] = greedy(srv.port)
        repeat = a.prefill_repeat
        if not model.endswith(".gguf"):
            # The trained model's byte tokenizer: a token per character, in half its context.
            repeat = max(1, min(repeat, a.trained_ctx // 2 // 45))
        prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * repeat)
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            r = post(srv.port, {"prompt": prompt, "max_tokens": 1, "temperature": 0})
            best = max(best, r["usage"]["prompt_tokens"] / (time.perf_counter() - t))
        res["prefill_tokens"] = r["usage"]["prompt_tokens"]
        res["prefill_tok_s"] = best
        one = loadgen(a, srv.port, 1, a.decode_tokens, 2)
        res["decode_tok_s_1"] = one["decode_tok_s_per_stream"]
        res["streams"] = {}
        for s in a.streams:
            if time.time() > a.deadline:
                log(f"time budget spent: {s} streams skipped")
                break
            res["streams"][s] = loadgen(a, srv.port, s, a.decode_tokens, 2)
            log(f"serving: {s} streams: {res['streams'][s]['tok_s']:.0f} tok/s")
    finally:
        srv.stop()


def compare_losses(gpu, cpu, tol):
    worst = max(abs(g - c) / max(1.0, abs(c)) for g, c in zip(gpu, cpu))
    return worst, worst <= tol and len(gpu) >= len(cpu)


def common_prefix(x, y):
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    return n


def env_info(device):
    info = {"device": device, "host_cpus": os.cpu_count()}
    if "cuda" in device:
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=30)
            info["gpu"] = q.stdout.strip()
        except Exception as e:
            info["gpu"] = f"nvidia-smi failed: {e}"
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True, help="anneal-runtime built with --features cuda")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", help="SmolLM2 GGUF; without it serving uses the trained 125M model")
    ap.add_argument("--python-torch", help="python with PyTorch for the reference (none: skipped)")
    ap.add_argument("--reference", default=os.path.join(HERE, "cpu_reference.json"))
    ap.add_argument("--write-reference", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU dry run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS)
    ap.add_argument("--mem-tbps", type=float, default=H200_TBPS)
    ap.add_argument("--loss-tol", type=float, default=0.02,
                    help="largest |gpu - cpu| / max(1, cpu) over the checked steps")
    ap.add_argument("--loss-tol-f32", type=float, default=0.002,
                    help="the same for the device's f32 run")
    ap.add_argument("--step-timeout", type=int, default=300)
    ap.add_argument("--budget", type=int, default=420,
                    help="seconds after which the remaining sections are skipped")
    a = ap.parse_args()
    a.deadline = time.time() + a.budget
    os.makedirs(a.out, exist_ok=True)
    a.streams = [1, 2, 4] if a.quick else [1, 16, 64]
    a.decode_tokens = 8 if a.quick else 128
    a.prefill_repeat = 8 if a.quick else 51  # ~512 tokens for SmolLM2
    a.serve_ctx = 256 if a.quick else 2048
    work = os.path.join(a.out, "work")
    os.makedirs(work, exist_ok=True)
    corpus(os.path.join(work, "corpus.txt"))
    res = {"env": env_info(a.device), "quick": a.quick}
    t_start = time.time()

    # 1. Training correctness against the CPU's curve.
    log(f"training check ({CHECK['name']}, {CHECK['steps']} steps) on {a.device}")
    chk = anneal_train(a, CHECK, work, a.device)
    res["check_losses"] = chk["losses"]
    if a.write_reference:
        serve = {}
        if a.model:
            serve_greedy(a, a.model, a.device, serve)
        rev = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"],
                             capture_output=True, text=True).stdout.strip()
        ref = {"note": "CPU f32 reference for bench.py, written by run.sh --write-reference",
               "written": time.strftime("%Y-%m-%d"), "source": rev,
               "check_config": CHECK, "check_losses": chk["losses"],
               "greedy_prompt": GREEDY_PROMPT, "greedy_tokens": GREEDY_TOKENS, "greedy_q4_1": "f32",
               "greedy_text": serve.get("greedy_text"),
               "model": os.path.basename(a.model) if a.model else None}
        with open(a.reference, "w") as f:
            json.dump(ref, f, indent=1)
            f.write("\n")
        log(f"wrote {a.reference}")
        return 0
    ref = json.load(open(a.reference)) if os.path.exists(a.reference) else {}
    if ref.get("check_losses"):
        worst, ok = compare_losses(chk["losses"], ref["check_losses"], a.loss_tol)
        res["loss_check"] = {"worst_rel": worst, "ok": ok, "tol": a.loss_tol}
        log(f"loss curve vs CPU: worst relative difference {worst:.4f} ({'ok' if ok else 'FAIL'})")
        # The same run in f32 on the device: only summation order differs from the CPU, so this
        # checks the device's kernels much more tightly than the bf16 run can.
        f32 = anneal_train(a, CHECK, work, a.device, "fp32")
        worst, ok = compare_losses(f32["losses"], ref["check_losses"], a.loss_tol_f32)
        res["loss_check_fp32"] = {"worst_rel": worst, "ok": ok, "tol": a.loss_tol_f32,
                                  "losses": f32["losses"]}
        log(f"fp32 loss curve vs CPU: worst relative difference {worst:.5f} ({'ok' if ok else 'FAIL'})")

    # 2. Training throughput, anneal and PyTorch.
    c = QUICK if a.quick else BIG
    a.trained_ctx = c["ctx"]
    vocab = c["vocab"] or 258
    fpt = train_flops_per_token(c, vocab)
    res["train_config"] = dict(c, params=params_of(c, vocab)["total"], flops_per_token=fpt)
    log(f"training throughput ({c['name']}: {params_of(c, vocab)['total'] / 1e6:.1f}M params)")
    try:
        big = anneal_train(a, c, work, a.device)
        res["anneal_train"] = {k: big[k] for k in ("tokens_per_sec", "losses", "wall_s")}
    except Exception as e:
        log(f"anneal training failed: {e}")
        res["anneal_train"] = {"error": str(e)}
        big = None
    log("PyTorch reference")
    res["torch_train"] = torch_train(a, c, work, a.device)

    # 3. Serving.
    model = None
    if time.time() > a.deadline:
        log("time budget spent: serving skipped")
    else:
        model = a.model if a.model and os.path.exists(a.model) else (big or {}).get("model_dir")
    res["serve_model"] = os.path.basename(model) if model else None
    if model and model.endswith(".gguf"):
        res["serve_bytes"] = os.path.getsize(model)
    res["serve"] = {}
    if model:
        log(f"serving {res['serve_model']} on {a.device}")
        try:
            if model == a.model:
                serve_greedy(a, model, a.device, res["serve"])
            serve_bench(a, model, a.device, res["serve"])
        except Exception as e:
            log(f"serving failed: {e}")
            res["serve"]["error"] = str(e)
        if model == a.model and ref.get("greedy_text") is not None and "greedy_text" in res["serve"]:
            got, want = res["serve"]["greedy_text"], ref["greedy_text"]
            res["greedy_check"] = {"same": got == want, "common_prefix_chars": common_prefix(got, want),
                                   "chars": len(want)}
    res["wall_s"] = round(time.time() - t_start, 1)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(table(a, res, ref))
    return 0


def fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


def table(a, res, ref):
    peak = a.peak_tflops * 1e12
    c = res["train_config"]
    at, tt = res.get("anneal_train") or {}, res.get("torch_train") or {}
    a_tps, t_tps = at.get("tokens_per_sec"), tt.get("tokens_per_sec")
    mfu = lambda tps: None if tps is None else 100 * tps * c["flops_per_token"] / peak
    gpu = "cuda" in a.device
    precision = "bf16 compute with f32 master weights" if gpu else "f32 (the CPU)"
    lines = [f"## anneal-runtime on {res['env'].get('gpu') or a.device}"
             + (" (QUICK dry run: sizes are tiny, figures mean nothing)" if a.quick else ""), "",
             f"Training: {c['params'] / 1e6:.1f}M parameters (hidden {c['hidden']}, {c['layers']} layers, "
             f"{c['heads']} heads / {c['kv_heads']} KV heads, SwiGLU {c['inter']}, vocab {c['vocab'] or 258}), "
             f"batch {c['batch']} x {c['ctx']} tokens, {precision}; "
             f"MFU = tokens/s x {c['flops_per_token'] / 1e6:.0f} MFLOP/token / {a.peak_tflops:.0f} TFLOP/s.", "",
             "| training | tokens/s | MFU % | loss after the last step |", "| --- | --- | --- | --- |",
             f"| anneal (candle) | {fmt(a_tps)} | {fmt(mfu(a_tps), '.1f')} | "
             f"{fmt((at.get('losses') or [None])[-1], '.4f')} |",
             f"| PyTorch {tt.get('torch', '')} eager{', autocast bf16' if tt.get('dtype') == 'bf16' else ''} | {fmt(t_tps)} | {fmt(mfu(t_tps), '.1f')} | "
             f"{fmt((tt.get('losses') or [None])[-1], '.4f')} |"]
    if a_tps and t_tps:
        lines.append(f"| anneal / PyTorch | {a_tps / t_tps:.2f}x | | |")
    if "error" in at:
        lines.append(f"| anneal failed | {at['error'][:200]} | | |")
    lc = res.get("loss_check")
    lines += ["", "| correctness | result |", "| --- | --- |"]
    if lc:
        what = "bf16" if gpu else "f32"
        lines.append(f"| loss of the first {len(ref['check_losses'])} steps ({what}) vs CPU f32 | worst relative "
                     f"difference {lc['worst_rel']:.4f} (tolerance {lc['tol']}): {'PASS' if lc['ok'] else 'FAIL'} |")
    lf = res.get("loss_check_fp32")
    if lf:
        lines.append(f"| the same with precision fp32 on the device | worst relative difference "
                     f"{lf['worst_rel']:.5f} (tolerance {lf['tol']}): {'PASS' if lf['ok'] else 'FAIL'} |")
    else:
        lines.append("| loss curve vs CPU | no reference file |")
    gc = res.get("greedy_check")
    if gc:
        lines.append(f"| SmolLM2 greedy text ({GREEDY_TOKENS} tokens, weights dequantized to f32) vs CPU | "
                     f"{'PASS: identical' if gc['same'] else 'FAIL: first %d of %d characters agree' % (gc['common_prefix_chars'], gc['chars'])} |")
    else:
        lines.append("| SmolLM2 greedy text vs CPU | skipped (no SmolLM2 file, or serving failed) |")
    s = res.get("serve") or {}
    lines += ["", f"Serving {res.get('serve_model')}:", ""]
    if "error" in s:
        lines.append(f"serving failed: {s['error'][:300]}")
    if s.get("streams"):
        lines += [f"| single stream | tokens/s |", "| --- | --- |",
                  f"| prefill ({s['prefill_tokens']}-token prompt, best of 3) | {s['prefill_tok_s']:.0f} |",
                  f"| decode ({a.decode_tokens} tokens after the first) | {s['decode_tok_s_1']:.1f} |"]
        if res.get("serve_bytes"):
            limit = a.mem_tbps * 1e12 / res["serve_bytes"]
            lines.append(f"| decode bandwidth limit ({res['serve_bytes'] / 1e6:.0f} MB of Q4_1 weights per token "
                         f"at {a.mem_tbps} TB/s) | {limit:.0f} (measured: {s['decode_tok_s_1'] / limit:.3f} of it) |")
        lines += ["",
                  "| streams | aggregate decode tok/s | per stream tok/s | latency p50 / p99 s | TTFT p50 / p99 s |",
                  "| --- | --- | --- | --- | --- |"]
        for n, r in s["streams"].items():
            lines.append(f"| {n} | {r['tok_s']:.0f} | {r['decode_tok_s_per_stream']:.1f} | "
                         f"{r['lat_p50']:.2f} / {r['lat_p99']:.2f} | {r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} |")
    lines += ["", f"whole run {res['wall_s']} s; logs and results.json in {a.out}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
