"""Peak memory of one micro-batch's forward and backward at Qwen2.5's vocabulary: the chunked
`common.lm_logprobs` against whole logits.

A tiny random decoder (Qwen2: hidden 256, 1 layer, untied head) with the real vocabulary of 151,936
tokens scores 4 rows of 1,024 completion positions (after a 64-token prompt) and backpropagates a
policy-gradient-like loss (the mean of the token log-probs times fixed advantages), two ways:

- whole: what the losses did before `lm_logprobs`: (4, 1025, 151936) fp32 logits divided
  by the temperature, log-softmax at the tokens, loss, backward;
- chunked: `common.lm_logprobs` (LOGPROB_CHUNK_ELEMENTS = 2**26 logits per chunk: 441 positions,
  10 chunks), same loss, backward.

Each variant runs in its own subprocess. On CPU its peak is the peak RSS (getrusage ru_maxrss, the
high-water mark reset through /proc/self/clear_refs once the model and inputs are built) minus the
RSS then; on CUDA, torch.cuda.max_memory_allocated minus the memory allocated then. The two losses
are printed too: they are the same number.

    OMP_NUM_THREADS=2 python benchmarks/memory.py [--vocab 151936] [--rows 4] [--positions 1024]
                                                  [--hidden 256] [--layers 1] [--threads 2]
                                                  [--output benchmarks/results/memory.json]

Measured with `OMP_NUM_THREADS=2 python benchmarks/memory.py` (the defaults; CPU, 2 threads shared
with other jobs, torch 2.13.0, transformers 5.23.0; benchmarks/results/memory.json):

    variant                                               peak MiB  seconds       loss
    whole logits (then log-softmax at the tokens)           11,983     33.0   9.631055
    chunked (lm_logprobs)                                    1,549     34.7   9.631055
    chunked / whole peak: 0.129 (required: <= 0.25)

The whole logits alone are 2,376 MiB (fp32); their quotient by the temperature, the log-sum-exp's
temporaries and the gradients are each as large. The chunked peak is a few tensors of one chunk
(441 positions: 256 MiB of fp32 logits) and the weight gradients of the head and the embedding
(148 MiB each): at 2,048 positions it was 1,642 MiB (`--variant chunked --positions 2048`, the
chunked run alone; the decoder's own activations grow, the chunks do not). The seconds move with
the load on the shared cores (an earlier run: 37.2 whole, 24.5 chunked).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

VARIANTS = {"whole": "whole logits (then log-softmax at the tokens)", "chunked": "chunked (lm_logprobs)"}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak():
    """Make the kernel's peak-RSS mark the current RSS (Linux >= 4.0), so building does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_variant(args):
    """One forward and backward; prints a JSON line {variant, peak_mb, seconds, loss}."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.set_num_threads(args.threads)
    device = common.default_device()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, max_position_embeddings=4096)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config).to(device)
    n, T, P = args.rows, args.positions, 64
    ids = torch.randint(0, args.vocab, (n, P + T), device=device)
    mask = torch.ones_like(ids)
    pos, tokens = common.positions(mask), ids[:, P:]
    adv = torch.randn(n, 1, device=device)
    temperature = 1.0
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset = reset_peak()
        base = rss_mb()
    start = time.perf_counter()
    if args.variant == "whole":
        logits, _ = common.lm_forward(model, ids, mask, pos, logits_to_keep=T + 1)
        logp = (lambda z: z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - z.logsumexp(-1))(
            logits[:, :-1].float() / temperature)
    else:
        logp = common.lm_logprobs(model, ids, mask, pos, tokens, temperature)[0].token
    loss = -(logp * adv).mean()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # ru_maxrss: KiB on Linux
    seconds = time.perf_counter() - start
    print(json.dumps(dict(variant=args.variant, peak_mb=peak, seconds=seconds, loss=loss.item(), device=device.type,
                          peak_reset=device.type == "cuda" or reset)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--positions", type=int, default=1024, help="completion positions scored per row")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--output", default="benchmarks/results/memory.json")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # set in the subprocesses
    args = p.parse_args()
    if args.variant:
        return run_variant(args)
    rows = []
    for variant in VARIANTS:  # one subprocess each: a peak RSS is per process
        argv = [sys.executable, __file__, "--variant", variant, "--vocab", str(args.vocab), "--rows", str(args.rows),
                "--positions", str(args.positions), "--hidden", str(args.hidden), "--layers", str(args.layers),
                "--threads", str(args.threads)]
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"error: the {variant} run failed ({out.returncode}):\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    whole, chunked = rows
    lines = [f"vocabulary {args.vocab:,}, {args.rows} rows x {args.positions:,} positions, hidden {args.hidden}, "
             f"{args.layers} layer(s), {whole['device']}",
             f"{'variant':<52} {'peak MiB':>9} {'seconds':>8} {'loss':>10}"]
    lines += [f"{VARIANTS[r['variant']]:<52} {r['peak_mb']:>9,.0f} {r['seconds']:>8.1f} {r['loss']:>10.6f}"
              for r in rows]
    ratio = chunked["peak_mb"] / whole["peak_mb"]
    lines.append(f"chunked / whole peak: {ratio:.3f} (required: <= 0.25)")
    print("\n".join(lines))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
               threads=args.threads, cpus=os.cpu_count(), loadavg=os.getloadavg(),
               chunk_elements=common.LOGPROB_CHUNK_ELEMENTS)
    out.write_text(json.dumps(dict(env=env,
                                   settings={k: v for k, v in vars(args).items() if k not in ("output", "variant")},
                                   results=rows, ratio=ratio), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
