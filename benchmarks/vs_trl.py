"""Step time against TRL: `GRPOTrainer` (TRL 1.16, transformers generation) and `grpo_latent.py`.

Both train the toy CoT checkpoint (checkpoints/toy-cot: plain GRPO) on the toy task with the same
settings: 16 prompts x 8 completions per step, at most 48 new tokens, temperature 1, top-p 1, beta 0,
one pass and one optimizer step per batch, loss_type dapo, learning rate 1e-5 (constant, no weight
decay), grad-norm clip 1, fp32, no gradient checkpointing (TRL defaults to bf16 and checkpointing:
both are turned off), 64 rows per forward pass, reward = common.is_correct, no evaluation or saving
between the timed steps. Each side runs in its own process with the same torch thread count, one
after the other, `--rounds` times (alternating which goes first). A step's time is the wall time
between the ends of consecutive optimizer steps (so everything counts: sampling, rewards, log-probs,
backward, optimizer, logging); each run drops its first `--warmup` steps, and medians are over the
next `--steps` of every round. The printed ratios are TRL's medians over ours. "rollout" is the generation
call alone (TRL: `model.generate`, timed by TRL's own profiling context; here: `common.generate`),
"rest" is the step minus it. TRL is not a requirement of this project: without it the benchmark
skips. Install it in a separate environment and point --trl_python at it:

    python3 -m venv /tmp/vtrl && /tmp/vtrl/bin/pip install --no-deps -r requirements-lock.txt
    /tmp/vtrl/bin/pip install --no-deps trl==1.16.0
    python benchmarks/vs_trl.py --trl_python /tmp/vtrl/bin/python [--rounds 2] [--steps 8] [--warmup 2]
                                [--threads 2] [--trl_defaults] [--output benchmarks/results/vs_trl_cpu.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = "skipping: trl is not importable by {python} (pip install trl==1.16.0, or pass --trl_python)"
PROMPTS, G, MICRO = 16, 8, 64  # prompts per step, completions per prompt, rows per forward pass


def run_ours(a, model):
    """grpo_latent.main in this process; a step ends when its metrics row is logged."""
    import common
    import grpo_latent
    ends, log = [], common.Logger.log

    def timed_log(self, metrics, step, quiet=False):
        log(self, metrics, step, quiet=True)
        if "loss" in metrics:  # a training row (evaluation rows have none)
            ends.append(dict(t=time.perf_counter(), rollout_s=metrics["rollout_s"], update_s=metrics["update_s"],
                             tokens=metrics["completion_length"] * PROMPTS * G, reward=metrics["reward"]))
    common.Logger.log = timed_log
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model", model, "--output_dir", out, "--max_steps", str(a.warmup + a.steps),
                "--train_batch_size", str(PROMPTS), "--num_generations", str(G), "--mini_batch_size", str(PROMPTS),
                "--micro_batch_size", str(MICRO), "--max_completion_length", str(a.max_completion_length),
                "--temperature", "1.0", "--top_p", "1.0", "--beta", "0", "--num_iterations", "1",
                "--loss_type", "dapo", "--learning_rate", str(a.learning_rate), "--weight_decay", "0",
                "--eval_every", str(10 ** 9), "--max_eval_samples", "16", "--seed", "0"]
        grpo_latent.main(common.parse_args(grpo_latent.Args, argv))
    return ends


def run_trl(a, model):
    """TRL's GRPOTrainer with a callback stamping each optimizer step's end and TRL's profiling timings."""
    import datasets
    import torch
    import trl.extras.profiling as profiling
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    import common
    ends, timings, logged = [], {}, {}  # per step: end time and rollout seconds; TRL's profiling sums; its logs

    def record(self, duration):  # TRL times model.generate in a profiling context; it reports only to trackers
        timings[self.name] = timings.get(self.name, 0.0) + duration
    profiling.ProfilingContext._log_metrics = record

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(dict(t=time.perf_counter(), rollout_s=timings.get("GRPOTrainer.transformers.generate", 0.0),
                             profile=dict(timings)))  # TRL's profiled blocks (nested: they overlap)
            timings.clear()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.setdefault(state.global_step, {}).update(logs or {})

    def reward(prompts, completions, answer, **kwargs):
        return [float(common.is_correct(c, gold)) for c, gold in zip(completions, answer)]
    rows = common.load_data("toy", "train")
    data = datasets.Dataset.from_list([{"prompt": common.format_prompt(None, ex["question"]), "answer": ex["answer"]}
                                       for ex in rows])
    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        same = {} if a.trl_defaults else dict(bf16=False, gradient_checkpointing=False)  # as grpo_latent: fp32, none
        cfg = GRPOConfig(output_dir=out, use_cpu=True, seed=0, **same,
                         per_device_train_batch_size=MICRO, gradient_accumulation_steps=PROMPTS * G // MICRO,
                         num_generations=G, max_completion_length=a.max_completion_length, temperature=1.0,
                         top_p=1.0, top_k=0, beta=0.0, num_iterations=1, loss_type="dapo", epsilon=0.2,
                         scale_rewards="group", learning_rate=a.learning_rate, lr_scheduler_type="constant",
                         weight_decay=0.0, max_grad_norm=1.0, max_steps=a.warmup + a.steps, logging_steps=1,
                         save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
        GRPOTrainer(model=policy, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                    callbacks=[Stamp()]).train()
    for i, e in enumerate(ends, 1):
        row = logged.get(i, {})
        e.update(tokens=row.get("completions/mean_length", float("nan")) * PROMPTS * G, reward=row.get("reward"))
    return ends


def child(a):
    """One side, in this process: prints `RESULT {json}` with its per-step rows."""
    import torch
    import transformers
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT))
    ends = (run_ours if a.side == "ours" else run_trl)(a, str(ROOT / "checkpoints" / "toy-cot"))
    steps = [dict(e, step_s=e["t"] - prev["t"]) for prev, e in zip(ends, ends[1:])][a.warmup - 1:]
    for s in steps:
        s.pop("t")
    versions = dict(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
    if a.side == "trl":
        import trl
        versions["trl"] = trl.__version__
    print("RESULT " + json.dumps(dict(side=a.side, versions=versions, steps=steps)), flush=True)


def spawn(python, side, a):
    threads = str(a.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    cmd = [python, __file__, "--side", side, "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--threads", str(a.threads), "--max_completion_length", str(a.max_completion_length),
           "--learning_rate", str(a.learning_rate)] + (["--trl_defaults"] if a.trl_defaults else [])
    load = os.getloadavg()[0]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    found = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not found:
        sys.stderr.write((p.stdout + p.stderr)[-4000:])
        raise SystemExit(f"error: the {side} side failed (exit {p.returncode})")
    # the 1-minute load average around the run (the run itself adds about --threads): other work skews timings
    return dict(json.loads(found[-1][len("RESULT "):]), loadavg=(load, os.getloadavg()[0]))


def summary(runs):
    """Medians over the timed steps of all of a side's rounds."""
    steps = [dict(s, round=i, loadavg=res["loadavg"]) for i, res in enumerate(runs) for s in res["steps"]]
    med = {k: statistics.median(s[k] for s in steps) for k in ("step_s", "rollout_s", "tokens")}
    med["rest_s"] = statistics.median(s["step_s"] - s["rollout_s"] for s in steps)
    return dict(side=runs[0]["side"], **med, versions=runs[0]["versions"], steps=steps)


def table(trl, ours):
    lines = ["| | s/step | rollout s | rest of step s | completion tokens/step |", "|---|---|---|---|---|"]
    for name, r in (("TRL 1.16 GRPOTrainer", trl), ("grpo_latent.py", ours)):
        lines.append(f"| {name} | {r['step_s']:.2f} | {r['rollout_s']:.2f} | {r['rest_s']:.2f} | {r['tokens']:,.0f} |")
    ratio = {k: trl[k] / ours[k] for k in ("step_s", "rollout_s", "rest_s")}
    lines.append(f"| TRL / grpo_latent | {ratio['step_s']:.2f}x | {ratio['rollout_s']:.2f}x "
                 f"| {ratio['rest_s']:.2f}x | |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trl_python", default=sys.executable, help="a Python that can import trl (default: this one)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side (medians over them)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating which goes first")
    p.add_argument("--warmup", type=int, default=2, help="steps run and dropped before the timed ones (at least 1)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (and OMP_NUM_THREADS) on both sides")
    p.add_argument("--max_completion_length", type=int, default=48, help="new tokens per completion at most")
    p.add_argument("--learning_rate", type=float, default=1e-5, help="learning rate on both sides")
    p.add_argument("--output", default="benchmarks/results/vs_trl_cpu.json", help="where the JSON results go")
    p.add_argument("--trl_defaults", action="store_true",
                   help="leave TRL's own defaults on (bf16 autocast, gradient checkpointing) instead of grpo_latent's")
    p.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # internal: run one side
    a = p.parse_args()
    if min(a.steps, a.warmup, a.rounds) < 1:
        raise SystemExit("error: --steps, --warmup and --rounds must be at least 1")
    if a.side:
        return child(a)
    if subprocess.run([a.trl_python, "-c", "import trl"], capture_output=True).returncode:
        print(SKIP.format(python=a.trl_python))
        return
    load_before = os.getloadavg()
    runs = {"ours": [], "trl": []}
    for i in range(a.rounds):  # alternate the order, so a slow drift in background load hits both sides alike
        for side in ("ours", "trl") if i % 2 == 0 else ("trl", "ours"):
            runs[side].append(spawn(sys.executable if side == "ours" else a.trl_python, side, a))
    ours, trl = summary(runs["ours"]), summary(runs["trl"])
    load_after = os.getloadavg()
    print(table(trl, ours))
    per_round = [statistics.median(r["step_s"] for r in t["steps"]) / statistics.median(r["step_s"] for r in o["steps"])
                 for t, o in zip(runs["trl"], runs["ours"])]  # far apart: background load came and went
    print(f"\nTRL / grpo_latent per step: {trl['step_s'] / ours['step_s']:.2f}x (rounds: "
          f"{', '.join(f'{r:.2f}x' for r in per_round)}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after)")
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = dict(python=platform.python_version(), machine=platform.machine(), processor=platform.processor(),
               cpus=os.cpu_count(), threads=a.threads, rounds=a.rounds, steps=a.steps, warmup=a.warmup, prompts=PROMPTS,
               num_generations=G, max_completion_length=a.max_completion_length, learning_rate=a.learning_rate,
               trl_defaults=a.trl_defaults, loadavg_before=load_before, loadavg_after=load_after)
    out.write_text(json.dumps(dict(env=env, ratio_step=trl["step_s"] / ours["step_s"], ratio_step_per_round=per_round,
                                   trl=trl, ours=ours), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
