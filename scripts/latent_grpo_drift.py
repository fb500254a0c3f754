"""Which part of Latent-GRPO's update lowers the probability of ending the think span?

For each checkpoint given, sample training batches as latent_grpo.py does (one-sided or two-sided
Gumbel noise on the latent scores, answers at T 0.6 / top-p 0.95, invalid-sample masking with the
authors' rule for a lone valid rollout) and measure, at the checkpoint:

  P  = the mean of log p(</think>) (temperature 1) over the latent positions of valid rollouts:
       the model's hazard of stopping; when it falls, chains grow, and at the cap they turn invalid;
  dP = -<grad P, grad L_c> for each part c of the policy-gradient loss L (ratio 1, i.e. the first
       mini-batch of a step; token-mean over the batch's scored positions): the first-order change
       of P from a plain gradient step of size 1 along that part alone. Parts: the first latent
       position, later latent positions, the </think> token and answer tokens, each split by the
       sign of its advantage; with first-token selection on (only the best correct rollout of a
       group keeps its first-position advantage) and off, on the same rollouts.

    python scripts/latent_grpo_drift.py checkpoints/toy-latent-sft runs/toy_results/latent_grpo/seed0/checkpoint-40
    python scripts/latent_grpo_drift.py --noise two-sided checkpoints/toy-latent-sft

Writes the table to stdout and, with --out, as JSON. A reading aid for the collapse study in docs/toy_results.md,
not part of any method: it imports latent_grpo.py for its pieces.
"""
import argparse
import functools
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import latent_grpo as lg  # noqa: E402


def sample_batch(model, tokenizer, cfg, data, args, one_sided, rng):
    end = common.require_tokens(tokenizer, [lg.START_THINK, lg.END_THINK], "a latent (mixture) model")[1]
    batch = [data[i] for i in rng.sample(range(len(data)), args.prompts)]
    make_step = functools.partial(lg.ThinkStep, model, lg.one_sided_latent(args.top_k, 1.0, 1.0, end, one_sided),
                                  end, cfg.get("max_latent_steps", 10 ** 9), 0.6, 0.95)
    r = common.generate(model, lg.think_prompts(tokenizer, cfg, [ex["question"] for ex in batch]), make_step,
                        args.max_completion_length, common.stop_ids(model, tokenizer), tokenizer.pad_token_id, args.G)
    texts = [common.decode_completion(tokenizer, r, i) for i in range(len(r.tokens))]
    correct = torch.tensor([common.is_correct(t, batch[i // args.G]["answer"]) for i, t in enumerate(texts)])
    return r, correct, end


def parts_of(r, end):
    """Boolean (N, T) masks of the scored positions by part."""
    live = r.mask.bool()
    is_lat = (r.kinds == common.LATENT_STEP) & live
    first = is_lat & (is_lat.cumsum(1) == 1)
    is_tok = (r.kinds == common.TOKEN) & live
    end_tok = is_tok & (r.tokens == end)
    return {"first latent": first, "later latents": is_lat & ~first, "</think>": end_tok, "answer": is_tok & ~end_tok}


def measure(model, r, correct, end, G):
    valid = r.finished
    adv = lg.valid_group_advantages(correct.float(), valid, G)  # the authors' rule: a lone valid rollout gets A = R
    parts = parts_of(r, end)
    loss_mask = sum(m.float() for m in parts.values())
    n_tok = loss_mask.sum()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.full(r.tokens.shape + (1,), end, dtype=torch.long)
    lp = common.completion_logprobs(model, r, None, 1.0, ids=ids, ids_temperature=1.0)
    hazard_mask = parts["first latent"] | parts["later latents"]
    hazard_mask = hazard_mask & valid[:, None]
    P = (lp.ids[..., 0] * hazard_mask).sum() / hazard_mask.sum().clamp(min=1)
    gP = torch.autograd.grad(P, params)
    logp, _ = lg.position_logprobs(model, r, slice(None), 0.6, ste="none")
    with torch.no_grad():
        seq_score = (logp * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)
    out = {"P": P.item(),
           "p_end_at_latents": (lp.ids[..., 0].exp() * hazard_mask).sum().item() / max(1, hazard_mask.sum().item()),
           "valid": valid.float().mean().item(), "correct": correct.float().mean().item(),
           "latents": hazard_mask.sum(1).float().mean().item(), "dP": {}}
    adv_full = adv[:, None].expand_as(loss_mask)
    adv_fts = lg.first_token_selection(adv_full.clone(), seq_score, correct.bool(), valid, G)
    for fts, adv_tok in (("FTS on", adv_fts), ("FTS off", adv_full)):
        for name, m in parts.items():
            for sign, sm in (("A>0", adv_tok > 0), ("A<0", adv_tok < 0)):
                sel = (m & sm).float()
                if sel.sum() == 0:
                    out["dP"][f"{fts} | {name} | {sign}"] = 0.0
                    continue
                loss = (-adv_tok * logp * sel).sum() / n_tok
                g = torch.autograd.grad(loss, params, retain_graph=True)
                out["dP"][f"{fts} | {name} | {sign}"] = -sum((a * b).sum() for a, b in zip(gP, g)).item()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--noise", default="one-sided", choices=["one-sided", "two-sided"])
    p.add_argument("--prompts", type=int, default=32, help="prompts per batch")
    p.add_argument("--batches", type=int, default=4, help="batches averaged per checkpoint")
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--max_completion_length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    data = common.load_data("toy", "train", None)
    results = {}
    for ckpt in a.checkpoints:
        model, tokenizer, cfg = common.load_model(ckpt)
        model.eval()
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w.requires_grad_(False)   # frozen in Latent-GRPO
        rng, per = random.Random(a.seed), []
        torch.manual_seed(a.seed)
        for _ in range(a.batches):
            with torch.no_grad():
                r, correct, end = sample_batch(model, tokenizer, cfg, data, a, a.noise == "one-sided", rng)
            per.append(measure(model, r, correct, end, a.G))
        res = {k: sum(x[k] for x in per) / len(per) for k in per[0] if k != "dP"}
        res["dP"] = {k: sum(x["dP"][k] for x in per) / len(per) for k in per[0]["dP"]}
        res["dP_sd"] = {k: (sum((x["dP"][k] - res["dP"][k]) ** 2 for x in per) / max(1, len(per) - 1)) ** 0.5
                        for k in per[0]["dP"]}
        results[ckpt] = res
        print(f"\n{ckpt} ({a.noise} noise, {a.batches} x {a.prompts} x {a.G} rollouts): P = mean log p(</think>) at "
              f"latents {res['P']:.3f}, p {res['p_end_at_latents']:.4f}, valid {res['valid']:.2f}, correct "
              f"{res['correct']:.3f}, latents/rollout {res['latents']:.1f}")
        print("| FTS | part | sign | dP (x1e-3) | sd over batches |\n|---|---|---|---|---|")
        for k, v in res["dP"].items():
            print("| " + " | ".join(k.split(" | ")) + f" | {1e3 * v:+.2f} | {1e3 * res['dP_sd'][k]:.2f} |")
        for fts in ("FTS on", "FTS off"):
            tot = sum(v for k, v in res["dP"].items() if k.startswith(fts))
            print(f"{fts}: total dP {1e3 * tot:+.2f} x1e-3")
    if a.out:
        Path(a.out).write_text(json.dumps({"noise": a.noise, "results": results}, indent=1))


if __name__ == "__main__":
    main()
