"""Evaluate any latent-rl checkpoint: greedy pass@1, sampled pass@k, reasoning length #L.

The checkpoint's latent_config.json says how it reasons (language CoT, Coconut latents, ...), so
one command evaluates every method's output. A plain model without that file is evaluated as
language CoT.

    python eval.py                                            # the toy Coconut checkpoint
    python eval.py --model runs/coconut_sft --num_samples 8   # + pass@8 at temperature 0.7
    python eval.py --model runs/cot --dataset openai/gsm8k --max_samples 0   # all 1319

#L counts latent slots plus the sampled tokens before the answer marker (as seeds 000 and 001
count reasoning length); "answer length" counts every sampled token.
"""
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
import common


@dataclass
class Args:
    model_name_or_path: str = field(default=common.TOY_COCONUT, metadata={"aliases": ["--model"], "help": "checkpoint folder, hub id or .gguf"})
    dataset: str = field(default="toy", metadata={"help": "toy, a hub dataset, or a local .jsonl/.parquet"})
    split: str = "test"
    max_samples: int = field(default=200, metadata={"help": "0 = the whole split"})
    num_samples: int = field(default=1, metadata={"help": "k for pass@k; > 1 adds sampled rollouts"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature for pass@k"})
    top_p: float = 1.0
    noise_scale: float = field(default=1.0, metadata={"help": "Gumbel noise on latent tokens for pass@k (mixture models)"})
    batch_size: int = 64
    max_completion_length: int = 128
    chat_template: bool = field(default=False, metadata={"help": "format questions with the chat template (plain models; a checkpoint's latent_config.json says how it prompts)"})
    system_prompt: str = field(default="auto", metadata={"help": "system turn with --chat_template on a plain model; auto = the answer format the checker reads (#### number, or \\boxed{} for MATH-style data)"})
    output_file: str = field(default="", metadata={"help": "JSON results; default <model>/eval_<dataset>_<split>.json"})
    show: int = field(default=3, metadata={"help": "completions to print"})
    show_latents: bool = field(default=False, metadata={"help": "print the decoded latent steps of the first --show questions (ATP-Latent)"})
    seed: int = 0


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021) from n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def generate(model, tokenizer, data, cfg, num_generations=1, temperature=0.0, top_p=1.0, batch_size=64,
             max_new_tokens=128, desc="eval", disable=False, noise_scale=0.0):
    """Roll out every question; returns per question a list of (completion, correct, #L, length)."""
    step = common.reasoning_step(cfg, tokenizer, temperature, top_p=top_p, model=model, noise_scale=noise_scale)
    per_batch = max(1, batch_size // num_generations)
    out = []
    model.eval()
    for i in tqdm(range(0, len(data), per_batch), desc=desc, leave=False, disable=disable):
        chunk = data[i:i + per_batch]
        prompts = common.reasoning_prompts(tokenizer, [ex["question"] for ex in chunk], cfg)
        r = common.rollout(model, prompts, step, max_new_tokens, common.stop_ids(model, tokenizer), tokenizer.pad_token_id,
                           num_generations=num_generations, store_latents=False)
        for j, ex in enumerate(chunk):
            rows = []
            for g in range(num_generations):
                n = j * num_generations + g
                text = common.decode_completion(tokenizer, r, n)
                rows.append((text, common.is_correct(text, ex["answer"]), common.reasoning_length(tokenizer, r, n),
                             int(((r.kinds[n] == common.TOKEN) & r.mask[n].bool()).sum())))
            out.append(rows)
    return out


def evaluate(model, tokenizer, data, cfg, num_samples=1, temperature=0.7, top_p=1.0, batch_size=64,
             max_new_tokens=128, disable_progress=False, d=None, noise_scale=1.0):
    """Greedy pass@1, mean #L and answer length; with num_samples > 1 also pass@k of sampled rollouts.
    Greedy means deterministic latents too (seed 001's "no sampling" mode); sampled rollouts of a
    mixture model add Gumbel noise of scale `noise_scale` to its latent tokens.
    Under torchrun (`d`), every rank evaluates an equal share and the means are averaged."""
    if d is not None and d.world > 1:
        data = data[:len(data) // d.world * d.world][d.rank::d.world]
        res = evaluate(model, tokenizer, data, cfg, num_samples, temperature, top_p, batch_size, max_new_tokens,
                       disable_progress or not d.main, noise_scale=noise_scale)
        return {k: (common.all_mean(v, d) if isinstance(v, float) else v) for k, v in res.items()}
    greedy = generate(model, tokenizer, data, cfg, 1, 0.0, 1.0, batch_size, max_new_tokens, "greedy", disable_progress)
    res = {
        "pass@1": float(np.mean([g[0][1] for g in greedy])),
        "mean_L": float(np.mean([g[0][2] for g in greedy])),
        "mean_length": float(np.mean([g[0][3] for g in greedy])),
        "n": len(data),
        "examples": [{"question": ex["question"], "answer": ex["answer"], "completion": g[0][0], "correct": g[0][1]}
                     for ex, g in zip(data, greedy)],
    }
    if num_samples > 1:
        sampled = generate(model, tokenizer, data, cfg, num_samples, temperature, top_p, batch_size, max_new_tokens,
                           f"pass@{num_samples}", disable_progress, noise_scale)
        res[f"pass@{num_samples}"] = float(np.mean([pass_at_k(num_samples, sum(s[1] for s in rows), num_samples) for rows in sampled]))
        res["sampled_acc"] = float(np.mean([s[1] for rows in sampled for s in rows]))
        res["sampled_mean_L"] = float(np.mean([s[2] for rows in sampled for s in rows]))
    return res


def main(args):
    common.seed_everything(args.seed)
    torch.set_grad_enabled(False)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path)
    data = common.load_data(args.dataset, args.split, args.max_samples or None, seed=args.seed)
    cfg = cfg or {"mode": "cot", **common.prompt_settings(args, None, data)}
    # --- ATP-Latent (atp_latent.py): its decoder's reading of each latent pair --------------------
    if args.show_latents:
        if cfg["mode"] != "atp":
            common.die(f"--show_latents needs a checkpoint with a latent decoder (mode atp); this one is {cfg['mode']!r}")
        import atp_latent
        decoder = atp_latent.load_decoder(args.model_name_or_path, model.device, model.dtype)
        for ex, (text, steps) in zip(data, atp_latent.decode_latents(model, tokenizer, cfg, [ex["question"] for ex in data[:args.show]], decoder)):
            print(f"--- {ex['question']} (gold {ex['answer']})\n    latents read as: {' | '.join(steps)}\n    then: {text!r}")
    # --- end ATP-Latent ----------------------------------------------------------------------------
    t0 = time.time()
    res = evaluate(model, tokenizer, data, cfg, args.num_samples, args.temperature, args.top_p, args.batch_size,
                   args.max_completion_length, noise_scale=args.noise_scale)
    res.update(model=args.model_name_or_path, dataset=args.dataset, split=args.split, mode=cfg["mode"],
               seconds=round(time.time() - t0, 1))
    for ex in res["examples"][:args.show]:
        print(f"--- {'correct' if ex['correct'] else 'wrong'} (gold {ex['answer']})\n{ex['question']}\n>>> {ex['completion']!r}")
    keys = ["pass@1"] + [k for k in res if k.startswith("pass@") and k != "pass@1"] + ["mean_L", "mean_length", "n"]
    print("\n| " + " | ".join(["model", "mode"] + keys) + " |\n|" + "---|" * (len(keys) + 2))
    print("| " + " | ".join([Path(args.model_name_or_path).name, cfg["mode"]] +
                            [f"{res[k]:.3f}" if isinstance(res[k], float) else str(res[k]) for k in keys]) + " |")
    out = args.output_file or (str(Path(args.model_name_or_path) / f"eval_{Path(args.dataset).stem}_{args.split}.json")
                               if Path(args.model_name_or_path).is_dir() else f"eval_{Path(args.dataset).stem}.json")
    Path(out).write_text(json.dumps(res, indent=2))
    print(f"results written to {out}")
    return res


if __name__ == "__main__":
    main(common.parse_args(Args))
