"""PyTorch reference of anneal's DPO step (post-bench.sh): reads what
`cargo bench --bench train-post -- dpo-check` wrote (DIR/base and DIR/policy in Hugging Face
llama layout, DIR/check.json: two batches' token ids, targets, masks, pair rows, and anneal's
reference log-probs and figures), loads the weights into transformers' LlamaForCausalLM (f32),
and computes TRL's sigmoid DPO loss of the same batches:

    logp(y)  = sum over completion tokens (mask 1) of log_softmax(logits)[target]
    loss     = mean over pairs of -logsigmoid(beta * ((logp(y+) - ref(y+)) - (logp(y-) - ref(y-))))
    rewards/chosen = beta * (logp(y+) - ref(y+)) (mean), rejected likewise, margins, accuracies
    grad norm = the global L2 norm of d loss / d weights (every weight trains in DPO)

Prints a side-by-side table with the absolute differences and exits 1 when the loss of the
moved policy differs from anneal's (each of its paths) by more than --tol (1e-4), when the
step-0 loss (policy = reference) is not ln 2 within 1e-6 (anneal's train_step, and PyTorch with
its own reference), when PyTorch's step-0 loss with anneal's reference log-probs is not anneal's
within --tol, or when a reward differs by more than
--tol. One JSON line with the figures goes to --json when given."""

import argparse, json, math, sys

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaForCausalLM

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def load(path):
    m = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    m.train(False)  # no dropout (none configured anyway)
    return m


def seq_logps(model, batch):
    inputs = torch.tensor(batch["inputs"], dtype=torch.long)
    targets = torch.tensor(batch["targets"], dtype=torch.long)
    mask = torch.tensor(batch["mask"], dtype=torch.float32)
    # Padding sits after each sequence's end: with causal attention it changes nothing before it.
    logits = model(input_ids=inputs).logits.float()
    logp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo(model, batch, beta, with_grad):
    """TRL's DPOTrainer, loss_type="sigmoid": its loss, metrics and the gradient norm."""
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(with_grad):
        logps = seq_logps(model, batch)
        pairs = batch["pairs"]
        chosen = logps[[p["chosen_row"] for p in pairs]]
        rejected = logps[[p["rejected_row"] for p in pairs]]
        ref_c = torch.tensor([p["ref_chosen"] for p in pairs], dtype=torch.float64)
        ref_r = torch.tensor([p["ref_rejected"] for p in pairs], dtype=torch.float64)
        # TRL: logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
        logits = (chosen.double() - rejected.double()) - (ref_c - ref_r)
        losses = -F.logsigmoid(beta * logits)
        loss = losses.mean()
        rc = beta * (chosen.double() - ref_c).detach()
        rr = beta * (rejected.double() - ref_r).detach()
    norm = float("nan")
    if with_grad:
        loss.backward()
        grads = [p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None]
        norm = float(torch.stack(grads).sum().sqrt())
    return {
        "loss": loss.item(), "rewards_chosen": float(rc.mean()), "rewards_rejected": float(rr.mean()),
        "rewards_margins": float((rc - rr).mean()), "rewards_accuracies": float((rc > rr).double().mean()),
        "grad_norm": norm,
    }, logps.detach().double()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    check = json.load(open(f"{a.dir}/check.json"))
    beta = check["beta"]
    b0, b1 = check["step0"]["batch"], check["step1"]["batch"]
    refs = lambda b: torch.tensor(sum(([q["ref_chosen"], q["ref_rejected"]] for q in b["pairs"]), []),
                                  dtype=torch.float64)
    rows = lambda b: sum(([q["chosen_row"], q["rejected_row"]] for q in b["pairs"]), [])

    base = load(f"{a.dir}/base")
    # Step 0: policy = reference = the base model.
    t0, base_logps0 = dpo(base, b0, beta, with_grad=True)
    with torch.no_grad():
        base_logps1 = seq_logps(base, b1).double()
    # PyTorch's own reference: the base model's log-probs in PyTorch.
    own = dict(b0, pairs=[dict(q, ref_chosen=float(base_logps0[q["chosen_row"]]),
                                ref_rejected=float(base_logps0[q["rejected_row"]])) for q in b0["pairs"]])
    t0_own, _ = dpo(base, own, beta, with_grad=False)
    ref_diff = max(float((base_logps0[rows(b0)] - refs(b0)).abs().max()),
                   float((base_logps1[rows(b1)] - refs(b1)).abs().max()))
    del base
    policy = load(f"{a.dir}/policy")
    t1, pol_logps = dpo(policy, b1, beta, with_grad=True)
    logp_diff = float((pol_logps - torch.tensor(check["step1"]["policy_logps"], dtype=torch.float64)).abs().max())

    ln2 = math.log(2)
    a0 = check["step0"]["train_step"]
    s1 = check["step1"]
    keys = ["loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies", "grad_norm"]
    print(f"\nDPO, {check['model']} ({check['parameters'] / 1e6:.2f}M parameters, vocab {check['vocab']}), "
          f"beta {beta}, {len(b1['pairs'])} pairs of {len(b1['inputs'][0])} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"\nstep 0 (policy = reference, ln 2 = {ln2:.9f}): anneal train_step {a0['loss']:.9f} "
          f"(|diff| {abs(a0['loss'] - ln2):.2e}); PyTorch with its own reference {t0_own['loss']:.9f} "
          f"(|diff| {abs(t0_own['loss'] - ln2):.2e}); PyTorch with anneal's reference log-probs "
          f"{t0['loss']:.9f} (|diff| {abs(t0['loss'] - ln2):.2e}, |anneal - PyTorch| {abs(a0['loss'] - t0['loss']):.2e}); "
          f"grad norm anneal {a0['grad_norm']:.6f} PyTorch {t0['grad_norm']:.6f}")
    print(f"reference log-probs: anneal's vs PyTorch's on the base weights, max |diff| {ref_diff:.2e} "
          f"(sums over completion tokens; values {float(refs(b1).min()):.3f}..{float(refs(b1).max()):.3f})")
    print(f"policy log-probs after one step (lr {check['lr']}): anneal (candle forward) vs PyTorch, max |diff| "
          f"{logp_diff:.2e}\n")
    print(f"{'step 1 (moved policy)':<22} {'anneal fused':>14} {'anneal autograd':>16} {'anneal step':>14} "
          f"{'PyTorch':>14} {'|fused-pt|':>11} {'|autograd-pt|':>13} {'|step-pt|':>10}")
    worst = {}
    for k in keys:
        f, g, s, t = s1["fused"][k], s1["autograd"][k], s1["train_step"][k], t1[k]
        d = [abs(x - t) for x in (f, g, s)]
        worst[k] = max(d)
        print(f"{k:<22} {f:>14.8f} {g:>16.8f} {s:>14.8f} {t:>14.8f} {d[0]:>11.2e} {d[1]:>13.2e} {d[2]:>10.2e}")
    failures = []
    if worst["loss"] > a.tol:
        failures.append(f"loss differs by {worst['loss']:.2e} > {a.tol}")
    for k in ["rewards_chosen", "rewards_rejected", "rewards_margins"]:
        if worst[k] > a.tol:
            failures.append(f"{k} differs by {worst[k]:.2e} > {a.tol}")
    if worst["rewards_accuracies"] != 0:
        failures.append("accuracies differ")
    if abs(a0["loss"] - ln2) > 1e-6 or abs(t0_own["loss"] - ln2) > 1e-6:
        failures.append("step-0 loss is not ln 2 within 1e-6")
    if abs(a0["loss"] - t0["loss"]) > a.tol:
        failures.append(f"step-0 loss differs by {abs(a0['loss'] - t0['loss']):.2e} > {a.tol}")
    rel_norm = worst["grad_norm"] / max(t1["grad_norm"], 1e-12)
    print(f"\ngradient norm: relative difference {rel_norm:.2e} (reported, not gated: sums over "
          f"{check['parameters'] / 1e6:.1f}M gradients in another order)")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    if a.json:
        with open(a.json, "w") as out:
            json.dump({"step0": {"anneal": a0, "pytorch": t0, "pytorch_own_reference": t0_own}, "step1": {**s1, "pytorch": t1},
                       "ref_logp_max_diff": ref_diff, "policy_logp_max_diff": logp_diff,
                       "failures": failures, "torch": torch.__version__}, out)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
