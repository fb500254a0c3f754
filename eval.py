"""Evaluate any latent-rl checkpoint: greedy pass@1, sampled pass@k, reasoning length #L.

The checkpoint's latent_config.json says how it reasons (language CoT, Coconut latents, ...), so
one command evaluates every method's output. A plain model without that file is evaluated as
language CoT.

    python eval.py                                            # the toy Coconut checkpoint
    python eval.py --model runs/coconut_sft --num_samples 8   # + pass@8 at temperature 0.7
    python eval.py --model runs/cot --dataset openai/gsm8k --max_samples 0   # all 1319

How a checkpoint reasons is defined by the method file that made its mode (MODE_FILES below):
eval.py imports that file and calls its `reasoning(model, tokenizer, cfg, temperature, top_p)`,
which returns the prompts and the rollout step; common.evaluate runs them. A file may also give
`load_extras` (modules saved beside the weights) and `show_latents` (--show_latents).

#L counts latent slots plus the sampled tokens before the answer marker (as seeds 000 and 001
count reasoning length); "answer length" counts every sampled token.
"""
import functools
import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import set_seed

import common
import toy


@dataclass
class Args:
    model_name_or_path: str = field(
        default=toy.COCONUT, metadata={"aliases": ["--model"], "help": "checkpoint folder or hub id"})
    dataset: str = field(
        default="", metadata={"help": "toy, prosqa-toy, a hub dataset or a local .jsonl/.parquet; "
                                      "default: the checkpoint's built-in task, else toy"})
    split: str = field(default="test", metadata={"help": "dataset split to evaluate"})
    max_samples: int = field(default=200, metadata={"help": "questions to evaluate (0 = the whole split)"})
    num_samples: int = field(default=1, metadata={"help": "k for pass@k; > 1 adds sampled rollouts"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature for pass@k"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling for pass@k"})
    noise_scale: float = field(
        default=1.0, metadata={"help": "Gumbel noise on latent tokens for pass@k (mixture models)"})
    batch_size: int = field(default=64, metadata={"help": "rollouts generated at once"})
    max_completion_length: int = field(
        default=128, metadata={"help": "generated positions per rollout, latents included"})
    chat_template: bool = field(
        default=False, metadata={"help": "format questions with the chat template (plain models; a checkpoint's "
                                         "latent_config.json says how it prompts)"})
    system_prompt: str = field(
        default="auto", metadata={"help": "system turn with --chat_template on a plain model; auto = the answer "
                                          "format the checker reads (#### number, or \\boxed{} for MATH-style data)"})
    output_file: str = field(default="", metadata={"help": "JSON results; default <model>/eval_<dataset>_<split>.json"})
    show: int = field(default=3, metadata={"help": "completions to print"})
    show_latents: bool = field(
        default=False, metadata={"help": "print the decoded latent steps of the first --show questions (ATP-Latent)"})
    seed: int = field(default=0, metadata={"help": "random seed (sampled rollouts)"})
    mode: Literal["auto", "cot", "multiplex"] = field(default="auto", metadata={
        "help": "reason as the checkpoint says (auto), in words (cot), or with multiplex thinking (any model)"})
    multiplex_k: int = field(default=3, metadata={"help": "--mode multiplex on a model not trained with it: K"})


# The file that defines how each mode reasons (its prompts and its rollout step); eval.py asks it.
MODE_FILES = {"cot": "coconut_sft", "coconut": "coconut_sft", "mixture": "latent_sft", "hybrid": "hrpo",
              "atp": "atp_sft", "multiplex": "multiplex_thinking"}


def method_file(cfg):
    mode = cfg.get("mode")
    if mode not in MODE_FILES:
        common.die(f"unknown reasoning mode {mode!r} in {common.LATENT_CONFIG} (known: {', '.join(MODE_FILES)})")
    try:
        return importlib.import_module(MODE_FILES[mode])
    except ModuleNotFoundError as e:
        common.die(f"mode {mode!r} needs {MODE_FILES[mode]}.py beside eval.py ({e})")


@torch.no_grad()
def main(args):
    common.check_args(args)
    set_seed(args.seed)
    model, tokenizer, cfg = common.load_model(args.model_name_or_path)
    trained_on = (cfg or {}).get("dataset", "")
    if not args.dataset:  # a checkpoint trained on a built-in task is evaluated on it (its test split)
        args.dataset = trained_on.partition(":")[0] if common.toy_task(trained_on) else "toy"
    data = common.load_data(args.dataset, args.split)  # the same questions whatever --seed
    if trained_on and common.one_pool(trained_on, args.dataset):  # never the rows the checkpoint trained on
        data = common.hold_out(data)[1]
        print(f"note: {args.dataset} is the pool this checkpoint trained on: evaluating its held-out tenth "
              f"({len(data)} rows)", flush=True)
    data = data[:args.max_samples or None]
    cfg = cfg or {"mode": "cot", **common.prompt_settings(args, None, data)}
    if args.mode != "auto" and args.mode != cfg["mode"]:  # e.g. training-free multiplex rollouts of a CoT model
        if cfg["mode"] not in ("cot", "multiplex"):
            common.die(f"--mode {args.mode} reads prompts as a cot or multiplex checkpoint does, not a "
                       f"{cfg['mode']!r} one")
        cfg = {"multiplex_k": args.multiplex_k, **cfg, "mode": args.mode}
    module = method_file(cfg)
    if hasattr(module, "load_extras"):  # modules a method keeps beside the weights (ATP-Latent's heads)
        module.load_extras(model, args.model_name_or_path, cfg)
    cfg = dict(cfg, noise_scale=args.noise_scale)  # latent noise for sampled rollouts (mixture models)
    if args.show_latents:  # a method that reads its latents back as text (ATP-Latent's step decoder)
        if not hasattr(module, "show_latents"):
            common.die(f"--show_latents needs a checkpoint with a latent decoder (mode atp); "
                       f"this one is {cfg['mode']!r}")
        module.show_latents(model, tokenizer, cfg, data[:args.show], args.model_name_or_path)
    t0 = time.time()
    res = common.evaluate(model, tokenizer, data, functools.partial(module.reasoning, model, tokenizer, cfg),
                          args.num_samples, args.temperature, args.top_p, args.batch_size, args.max_completion_length)
    res.update(model=args.model_name_or_path, dataset=args.dataset, split=args.split, mode=cfg["mode"],
               seconds=round(time.time() - t0, 1))
    for ex in res["examples"][:args.show]:
        verdict = "correct" if ex["correct"] else "wrong"
        print(f"--- {verdict} (gold {ex['answer']})\n{ex['question']}\n>>> {ex['completion']!r}")
    keys = ["pass@1"] + [k for k in res if k.startswith("pass@") and k != "pass@1"] + ["mean_L", "mean_length", "n"]
    print("\n| " + " | ".join(["model", "mode"] + keys) + " |\n|" + "---|" * (len(keys) + 2))
    print("| " + " | ".join([Path(args.model_name_or_path).name, cfg["mode"]] +
                            [f"{res[k]:.3f}" if isinstance(res[k], float) else str(res[k]) for k in keys]) + " |")
    out = args.output_file or (str(Path(args.model_name_or_path) / f"eval_{Path(args.dataset).stem}_{args.split}.json")
                               if Path(args.model_name_or_path).is_dir() else f"eval_{Path(args.dataset).stem}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))
    print(f"results written to {out}")
    return res


if __name__ == "__main__":
    main(common.parse_args(Args))
