"""PyTorch eager reference for the fine-tuning speed rows of post-bench.sh: the same model
(Hugging Face llama layout written by `cargo bench --bench train-post -- export`, loaded into
transformers' LlamaForCausalLM, f32), the same batches anneal trained on (DIR/batches.json
from `train-post -- speed`), the same optimiser as anneal's defaults (AdamW 0.9/0.95, eps 1e-8,
weight decay on matrices only, global clip 1.0, constant learning rate) and thread count.

--mode full:    every weight trains (SFT: masked mean NLL of the answer tokens)
--mode frozen:  the lowest floor(F x layers) blocks frozen (--freeze F), and the embedding with
                them unless it is tied to the head (anneal's freezeFraction)
--mode lora:    a hand-written LoRA adapter (B @ A, rank --rank, scale --alpha / rank, B starts
                at zero) on --targets, every base weight frozen (peft is not installed)
--mode dpo:     TRL's sigmoid DPO loss on the batches' preference pairs against the reference
                log-probs anneal computed (the reference pass is not timed, as in anneal)

Prints one JSON line: tokens/s over the steps after the first (real input tokens, the count
anneal reports), each step's seconds (wall and CPU, all threads) and loss, peak RSS (ru_maxrss) and the RSS after loading."""

import argparse, json, math, resource, time

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import LlamaForCausalLM

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


class LoRA(nn.Module):
    def __init__(self, base: nn.Linear, rank, alpha):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.empty(rank, base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.a.t() @ self.b.t()) * self.scale


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="Hugging Face directory (train-post export)")
    p.add_argument("--batches", required=True, help="batches.json of train-post speed")
    p.add_argument("--mode", choices=["full", "frozen", "lora", "dpo"], default="full")
    p.add_argument("--freeze", type=float, default=0.8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    spec = json.load(open(a.batches))
    model = LlamaForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
    model.train()
    layers = model.model.layers
    tied = model.config.tie_word_embeddings
    if a.mode == "frozen":
        frozen = math.floor(a.freeze * len(layers))
        for layer in layers[:frozen]:
            layer.requires_grad_(False)
        if not tied:
            model.model.embed_tokens.requires_grad_(False)
    elif a.mode == "lora":
        model.requires_grad_(False)
        targets = set(a.targets.split(","))
        for layer in layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, child in list(parent.named_children()):
                    if name in targets:
                        setattr(parent, name, LoRA(child, a.rank, a.alpha))
    params = [q for q in model.parameters() if q.requires_grad]
    decay = [q for q in params if q.dim() >= 2]
    other = [q for q in params if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    loaded_rss = rss_mib()
    beta = spec.get("beta", 0.1)
    secs, cpu, losses, tokens = [], [], [], []
    for b in spec["batches"]:
        inputs = torch.tensor(b["inputs"], dtype=torch.long)
        targets = torch.tensor(b["targets"], dtype=torch.long)
        mask = torch.tensor(b["mask"], dtype=torch.float32)
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = model(input_ids=inputs).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if a.mode == "dpo":
            seq = (logp * mask).sum(-1)
            pairs = b["pairs"]
            c = seq[[q["chosen_row"] for q in pairs]] - torch.tensor([q["ref_chosen"] for q in pairs])
            r = seq[[q["rejected_row"] for q in pairs]] - torch.tensor([q["ref_rejected"] for q in pairs])
            loss = -F.logsigmoid(beta * (c - r)).mean()
        else:
            loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(loss.item(), 6))
        secs.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        tokens.append(b["n_inputs"])
    out = {
        "mode": a.mode, "tokens_per_sec": sum(tokens[1:]) / sum(secs[1:]), "step_secs": secs,
        "step_cpu_secs": cpu, "tokens": tokens, "losses": losses, "trainable": sum(q.numel() for q in params),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_load_mib": loaded_rss, "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if a.mode == "lora":
        out["lora"] = {"rank": a.rank, "alpha": a.alpha, "targets": a.targets}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
