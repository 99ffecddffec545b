"""PyTorch reference for bench.sh (CPU) and ../gpu/run.sh (GPU): the same decoder-only
architecture as anneal's (pre-norm RMSNorm, interleaved RoPE, grouped KV heads, SwiGLU, untied
head), the same byte tokenizer (256 bytes + BOS + EOS; --vocab pads the table like anneal's
vocabSize), AdamW + warm-up/cosine + clipping, trained on the same text file. Prints one JSON
line: tokens/s (steps after the first --skip, default 1) and the loss per step.

--device cuda --dtype bf16 is PyTorch's usual mixed precision: f32 weights and optimizer,
matmuls under torch.autocast in bf16 (what anneal does on a GPU)."""

import argparse, json, math, random, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, cos, sin):
    # Interleaved pairs (x[2i], x[2i+1]), as GGUF llama and anneal use.
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        h, hd = a.hidden, a.hidden // a.heads
        self.heads, self.kv, self.hd = a.heads, a.kv_heads, hd
        self.attn_norm, self.ffn_norm = RMSNorm(h, 1e-5), RMSNorm(h, 1e-5)
        self.q = nn.Linear(h, a.heads * hd, bias=False)
        self.k = nn.Linear(h, a.kv_heads * hd, bias=False)
        self.v = nn.Linear(h, a.kv_heads * hd, bias=False)
        self.o = nn.Linear(a.heads * hd, h, bias=False)
        self.gate = nn.Linear(h, a.inter, bias=False)
        self.up = nn.Linear(h, a.inter, bias=False)
        self.down = nn.Linear(a.inter, h, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        y = self.attn_norm(x)
        q = self.q(y).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.k(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(y).view(b, t, self.kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = self.heads // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, -1))
        y = self.ffn_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.emb = nn.Embedding(a.vocab, a.hidden)
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = RMSNorm(a.hidden, 1e-5)
        self.head = nn.Linear(a.hidden, a.vocab, bias=False)
        hd = a.hidden // a.heads
        inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(a.ctx).float(), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens):
        t = tokens.shape[1]
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, self.cos[:t], self.sin[:t])
        return self.head(self.norm(x))


def main():
    p = argparse.ArgumentParser()
    for name, default in [("hidden", 128), ("layers", 4), ("heads", 4), ("kv_heads", 4), ("inter", 344),
                          ("ctx", 256), ("batch", 8), ("steps", 10), ("threads", 2), ("warmup", 2)]:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data", required=True)
    p.add_argument("--vocab", type=int, default=258, help="embedding rows (>= 258)")
    p.add_argument("--skip", type=int, default=1, help="steps left out of tokens/s (warm-up)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype")
    a = p.parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    random.seed(0)
    text = open(a.data, "rb").read()
    stream = [256]
    for para in text.split(b"\n\n"):
        para = para.strip()
        if para:
            stream += list(para) + [257, 256]
    windows = [stream[i:i + a.ctx + 1] for i in range(0, len(stream) - a.ctx - 1, a.ctx)]
    model = Model(a).to(dev)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    losses, start, tokens = [], None, 0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")
    for step in range(a.steps):
        lr = a.lr * (step + 1) / a.warmup if step < a.warmup else \
            0.1 * a.lr + 0.45 * a.lr * (1 + math.cos(math.pi * (step - a.warmup) / max(1, a.steps - a.warmup)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = torch.tensor([random.choice(windows) for _ in range(a.batch)]).to(dev)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast:
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, a.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))  # .item() waits for the GPU
        if step == a.skip - 1:
            sync()
            start = time.perf_counter()
        elif step >= a.skip:
            tokens += x.numel()
    sync()
    elapsed = time.perf_counter() - start
    out = {"params": params, "tokens_per_sec": tokens / elapsed, "losses": losses,
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(dev),
           "dtype": a.dtype}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(dev)
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
