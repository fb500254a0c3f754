"""Every toy number in README.md and docs/toy_results.md, from one script: it trains each RL method
and its key ablations from the same start checkpoints with several seeds, evaluates every result
with eval.py on 1,000 test questions (greedy pass@1, #L, and pass@8 with sampling: Gumbel noise on
the latent scores for mixture models), and writes docs/toy_results.json, the tables between their
`<!-- toy_results:NAME -->` markers (README.md, docs/toy_results.md) and docs/toy_results.png
(accuracy against reasoning length).

    python scripts/toy_results.py                    # run what is missing, 2 jobs at a time, then collect
    python scripts/toy_results.py --collect          # only the tables and the figure, from finished runs
    python scripts/toy_results.py --only latent_grpo --seeds 0 1 2
    python scripts/toy_results.py --list             # every job and whether it is done

Runs go to runs/toy_results/<job>/seed<s>/ (a job's log beside its folder); a finished job
(its eval file exists) is never rerun, so the script can be stopped and started again, and two
copies can share the work (each job is claimed by a lock file). Each job runs with
OMP_NUM_THREADS=1, so --jobs 2 keeps this machine's 2 cores busy. A start checkpoint that is not
committed (the ProsQA-toy models, ATP-Latent's SFT) is itself a job the others wait for.

Statistics: a trained method's number is the mean over its seeds with a 95% t-interval
(t(0.975, n-1) * sd / sqrt(n), 4.30 * sd / sqrt(3) for 3 seeds); it measures how much the result
moves between training seeds. A start checkpoint is one model, evaluated once: its interval is
the binomial (Wilson) interval of 1,000 questions, about +-3 points.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "toy_results"
N_TEST = 1000
K = 8

# ---- the starts: committed checkpoints, or jobs trained once (seed 0) that other jobs wait for
STARTS = {
    "toy-cot": {"label": "CoT SFT (`checkpoints/toy-cot`)", "path": "checkpoints/toy-cot", "task": "toy"},
    "toy-coconut": {"label": "Coconut SFT (`checkpoints/toy-coconut`)", "path": "checkpoints/toy-coconut",
                    "task": "toy"},
    "toy-latent-sft": {"label": "Latent-SFT (`checkpoints/toy-latent-sft`)", "path": "checkpoints/toy-latent-sft",
                       "task": "toy"},
    "toy-cot-multiplex": {"label": "CoT SFT, training-free multiplex rollouts (K = 3)", "path": "checkpoints/toy-cot",
                          "task": "toy", "eval": ["--mode", "multiplex"]},
    "toy-atp-sft": {"label": "ATP-Latent SFT (from toy-cot)", "task": "toy",
                    "cmd": ["atp_sft.py", "--model", "checkpoints/toy-cot"]},
    "prosqa-cot": {"label": "CoT SFT on ProsQA-toy", "task": "prosqa-toy",
                   "cmd": ["coconut_sft.py", "--model", "toy", "--dataset", "prosqa-toy", "--start_stage", "0",
                           "--end_stage", "0", "--epochs_per_stage", "3", "--learning_rate", "3e-3",
                           "--lr_scheduler_type", "cosine", "--warmup_steps", "30", "--max_completion_length", "128"]},
    "prosqa-coconut": {"label": "Coconut SFT on ProsQA-toy", "task": "prosqa-toy", "after": "prosqa-cot",
                       "cmd": ["coconut_sft.py", "--model", "{prosqa-cot}", "--dataset", "prosqa-toy",
                               "--max_latent_stage", "4", "--c_thought", "1", "--end_stage", "4",
                               "--max_steps", "80", "--max_completion_length", "128"]},
}

# ---- the trained methods: (job, table, label, start, script and its flags)
METHODS = [
    ("latent_grpo", "rl", "Latent-GRPO (all three designs)", "toy-latent-sft",
     ["latent_grpo.py", "--save_steps", "20"]),
    ("latent_grpo_no_fts", "rl", "Latent-GRPO w/o first-token selection", "toy-latent-sft",
     ["latent_grpo.py", "--first_token_selection", "false", "--save_steps", "20"]),
    ("latent_grpo_no_onesided", "rl", "Latent-GRPO w/o one-sided noise (two-sided, no STE)", "toy-latent-sft",
     ["latent_grpo.py", "--one_sided_noise", "false", "--ste", "none", "--save_steps", "20"]),
    ("soft_grpo", "rl", "Soft-GRPO", "toy-latent-sft", ["soft_grpo.py"]),
    ("grpo_coconut", "rl", "GRPO on Coconut", "toy-coconut", ["grpo_latent.py"]),
    ("grpo_cot", "rl", "GRPO on CoT (plain GRPO)", "toy-cot", ["grpo_latent.py"]),
    ("hrpo", "rl", "HRPO (LoRA, gate)", "toy-cot", ["hrpo.py"]),
    ("hrpo_no_gate", "rl", "HRPO, no gate: input (e + h~)/2", "toy-cot", ["hrpo.py", "--no_gate"]),
    ("latent_value_rl", "rl", "latent value RL", "toy-coconut", ["latent_value_rl.py"]),
    ("latent_value_rl_frozen", "rl", "latent value RL, frozen head", "toy-coconut",
     ["latent_value_rl.py", "--freeze_value_head"]),
    ("latent_grpo_zero_single", "rl", "Latent-GRPO, lone valid rollout A = 0 (the paper)", "toy-latent-sft",
     ["latent_grpo.py", "--single_valid_advantage", "zero", "--save_steps", "20"]),
    ("atp_rl", "rl", "ATP-Latent RL", "toy-atp-sft", ["atp_rl.py"]),
    ("multiplex_k3", "rl", "Multiplex Thinking, K = 3", "toy-cot", ["multiplex_thinking.py"]),
    ("multiplex_k2", "rl", "Multiplex Thinking, K = 2", "toy-cot", ["multiplex_thinking.py", "--multiplex_k", "2"]),
    ("multiplex_k1", "rl", "Multiplex Thinking, K = 1 (plain GRPO)", "toy-cot",
     ["multiplex_thinking.py", "--multiplex_k", "1"]),
    ("prosqa_grpo_cot", "prosqa", "GRPO on CoT", "prosqa-cot", ["grpo_latent.py", "--max_completion_length", "128"]),
    ("prosqa_grpo_coconut", "prosqa", "GRPO on Coconut", "prosqa-coconut",
     ["grpo_latent.py", "--max_completion_length", "128"]),
]


ABLATIONS = {"hrpo_no_gate", "latent_value_rl_frozen", "latent_grpo_zero_single"}   # run after the methods' seeds


def start_dir(name):
    """The start's model folder: committed, or trained by this script."""
    s = STARTS[name]
    return ROOT / s["path"] if "path" in s else RUNS / name


def eval_file(folder):
    return Path(folder) / f"eval{N_TEST}.json"


def jobs(only=(), seeds=(0, 1, 2)):
    """Every job as (name, seed, folder, training argv or None, the start it waits for), in the
    order they run: the starts to evaluate, every method's first seed, then the next seeds (so a
    stopped session leaves every method with as many seeds as possible)."""
    out, trained_starts = [], []
    for name, s in STARTS.items():
        cmd = ([a.replace("{" + s["after"] + "}", str(start_dir(s["after"]))) for a in s["cmd"]]
               if "after" in s else s.get("cmd"))
        (trained_starts if cmd else out).append((name, 0, RUNS / name, cmd, s.get("after")))
    def job(name, seed, start, argv):
        return (name, seed, RUNS / name / f"seed{seed}",
                argv + ["--model", str(start_dir(start)), "--seed", str(seed)], start)
    for seed in seeds:   # the methods first, seed by seed; the ablations' later seeds last
        out += [job(name, seed, start, argv) for name, _, _, start, argv in METHODS
                if seed == seeds[0] or name not in ABLATIONS]
        if seed == seeds[0]:
            out += trained_starts
    out += [job(name, seed, start, argv) for seed in seeds[1:] for name, _, _, start, argv in METHODS
            if name in ABLATIONS]
    return [j for j in out if not only or j[0] in only]


def run_job(job):
    """Train (unless it is a committed start), then eval.py on N_TEST questions; skip what is done."""
    name, seed, folder, cmd, _ = job
    model = start_dir(name) if name in STARTS else folder
    if eval_file(folder).is_file():
        return f"{name}/seed{seed}: done"
    lock = Path(str(folder) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return f"{name}/seed{seed}: claimed by another copy ({lock})"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = open(str(folder) + ".log", "a")
    t0 = time.time()
    try:
        if cmd and not (folder / "latent_config.json").is_file():
            argv = [sys.executable, cmd[0], *cmd[1:], "--output_dir", str(folder)]
            log.write(f"$ {' '.join(argv)}\n"); log.flush()
            subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        train_s = time.time() - t0
        argv = [sys.executable, "eval.py", "--model", str(model), "--max_samples", str(N_TEST),
                "--num_samples", str(K), "--max_completion_length", "128", "--seed", str(seed),
                "--output_file", str(eval_file(folder)) + ".tmp", *STARTS.get(name, {}).get("eval", [])]
        log.write(f"$ {' '.join(argv)}\n"); log.flush()
        subprocess.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
        res = json.loads(Path(str(eval_file(folder)) + ".tmp").read_text())
        res["train_seconds"] = round(train_s, 1)
        res["eval_seconds"] = round(time.time() - t0 - train_s, 1)
        eval_file(folder).write_text(json.dumps(res))
        Path(str(eval_file(folder)) + ".tmp").unlink()
        return f"{name}/seed{seed}: pass@1 {res['pass@1']:.3f} #L {res['mean_L']:.1f} ({time.time() - t0:.0f} s)"
    except subprocess.CalledProcessError as e:
        return f"{name}/seed{seed}: FAILED ({e.returncode}), see {folder}.log"
    finally:
        log.close()
        os.close(fd)
        lock.unlink()


def run_all(todo, n_jobs):
    """Run jobs n_jobs at a time; a job starts once the start it waits for is done."""
    pending = [j for j in todo if not eval_file(j[2]).is_file()]
    print(f"{len(pending)} jobs to run ({len(todo) - len(pending)} done)")
    with ThreadPoolExecutor(n_jobs) as pool:
        running = {}
        while pending or running:
            for j in list(pending):
                if len(running) >= n_jobs:
                    break
                wait_for = j[4]
                if wait_for and "cmd" in STARTS.get(wait_for, {}) and not eval_file(RUNS / wait_for).is_file():
                    continue
                pending.remove(j)
                running[pool.submit(run_job, j)] = j
            if not running:  # everything left waits for a start that did not finish
                print("waiting for starts that are not done:", sorted({j[4] for j in pending}))
                return
            done = [f for f in running if f.done()]
            for f in done:
                print(time.strftime("%H:%M:%S"), f.result(), flush=True)
                del running[f]
            if not done:
                time.sleep(5)


# ---- statistics
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}


def mean_ci(xs):
    """Mean and the half-width of the 95% t-interval over seeds (None for one value)."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def wilson(p, n, z=1.96):
    """The 95% Wilson interval of a proportion p of n, as (low, high)."""
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return c - h, c + h


def metrics(folder):
    path = Path(folder) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def window(rows, key, lo, hi):
    """Mean of key over training steps lo..hi (inclusive)."""
    xs = [r[key] for r in rows if key in r and lo <= r.get("step", 0) <= hi]
    return sum(xs) / len(xs) if xs else None


def prosqa_steps(examples):
    """What a ProsQA-toy model's greedy completions do, from eval.py's examples: the fraction whose
    answer names one of the two offered concepts, how often such an answer is the right one (a
    guess between the two is right half the time: above 50% is reachability, not format), and the
    fraction of written steps "Every a is a b." that are facts of the question (None without
    written steps: a Coconut model thinks them in latents). They tell a model that cannot look a
    fact up in its context from one that looks facts up but takes wrong turns."""
    options = right = facts = steps = 0
    for ex in examples:
        offered = re.search(r"Is \w+ a (\w+) or a (\w+)\?", ex["question"]).groups()
        given = set(re.findall(r"Every (\w+) is a (\w+)\.", ex["question"]))
        written = re.findall(r"Every (\w+) is a (\w+)\.", ex["completion"])
        answer = re.search(r"###\s*(\w+)", ex["completion"])
        named = bool(answer) and answer.group(1) in offered
        options += named
        right += named and bool(ex["correct"])
        facts += sum(step in given for step in written)
        steps += len(written)
    return {"answer_offered": options / len(examples), "offered_right": right / options if options else None,
            "steps_in_question": facts / steps if steps else None}


def collect(seeds):
    results = {"n_test": N_TEST, "k": K, "starts": {}, "methods": {}}
    for name, s in STARTS.items():
        f = eval_file(RUNS / name)
        if not f.is_file():
            continue
        res = json.loads(f.read_text())
        results["starts"][name] = {"label": s["label"], "task": s["task"], "pass@1": res["pass@1"],
                                   f"pass@{K}": res.get(f"pass@{K}"), "mean_L": res["mean_L"],
                                   "pass@1_ci": wilson(res["pass@1"], res["n"]), "n": res["n"]}
        if s["task"] == "prosqa-toy":
            results["starts"][name].update(prosqa_steps(res["examples"]))
    for name, table, label, start, argv in METHODS:
        per_seed = {}
        for seed in seeds:
            folder = RUNS / name / f"seed{seed}"
            if not eval_file(folder).is_file():
                continue
            res = json.loads(eval_file(folder).read_text())
            rows = metrics(folder)
            steps = max((r.get("step", 0) for r in rows), default=0)
            per_seed[seed] = {"pass@1": res["pass@1"], f"pass@{K}": res.get(f"pass@{K}"), "mean_L": res["mean_L"],
                              "train_seconds": res.get("train_seconds"), "steps": steps,
                              **{f"{key}_{a}-{b}": window(rows, key, a, b)
                                 for key in ("reward", "valid_frac", "n_latents", "kl", "hidden_ratio", "acc",
                                             "mean_value", "coherence")
                                 for a, b in ((1, 10), (steps - 9, steps)) if steps}}
            if STARTS[start]["task"] == "prosqa-toy":
                per_seed[seed].update(prosqa_steps(res["examples"]))
            for step in (20, 40):
                acc = [r["eval_acc"] for r in rows if r.get("step") == step and "eval_acc" in r]
                if acc:
                    per_seed[seed][f"eval_acc@{step}"] = acc[0]
        if not per_seed:
            continue
        entry = {"label": label, "table": table, "start": start,
                 "command": " ".join(["python"] + argv + ["--seed", "S"]), "seeds": per_seed}
        for key in ("pass@1", f"pass@{K}", "mean_L", "answer_offered", "offered_right", "steps_in_question"):
            xs = [v[key] for v in per_seed.values() if v.get(key) is not None]
            if xs:
                entry[key], entry[key + "_ci"] = mean_ci(xs)
        results["methods"][name] = entry
    return results


# ---- tables and the figure
def pct(m, ci=None):
    if m is None:
        return ""
    return f"{100 * m:.1f}" + (f" ± {100 * ci:.1f}" if ci is not None else "")


def table(results, table_name):
    starts = {m["start"] for m in results["methods"].values() if m["table"] == table_name}
    prosqa = table_name == "prosqa"   # and what its greedy completions do (`prosqa_steps`)
    extra = (" answers naming an offered concept (%) | of those, right (%; a guess: 50) |"
             " written steps that are facts of the question (%) |") if prosqa else ""
    lines = [f"| model | seeds | pass@1 (%) | pass@{K} (%) | #L | minutes |" + extra,
             "|---|---|---|---|---|---|" + "---|---|---|" * prosqa]
    def steps_cells(m):
        if not prosqa:
            return ""
        return " " + " | ".join(pct(m.get(key), m.get(key + "_ci")) or "—"
                                for key in ("answer_offered", "offered_right", "steps_in_question")) + " |"
    for sname in STARTS:
        if sname not in starts or sname not in results["starts"]:
            continue
        s = results["starts"][sname]
        lo, hi = s["pass@1_ci"]
        lines.append(f"| **{s['label']}** | start | {100 * s['pass@1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                     f"{pct(s.get(f'pass@{K}'))} | {s['mean_L']:.1f} | |" + steps_cells(s))
        for name, m in results["methods"].items():
            if m["start"] != sname or m["table"] != table_name:
                continue
            mins = [v["train_seconds"] / 60 for v in m["seeds"].values() if v.get("train_seconds")]
            per = ", ".join(f"{100 * v['pass@1']:.1f}" for v in m["seeds"].values())
            length = f"{m['mean_L']:.1f}" + (f" ± {m['mean_L_ci']:.1f}" if m.get("mean_L_ci") is not None else "")
            lines.append(f"| {m['label']} | {len(m['seeds'])} ({per}) | {pct(m['pass@1'], m.get('pass@1_ci'))} | "
                         f"{pct(m.get(f'pass@{K}'), m.get(f'pass@{K}_ci'))} | {length} | "
                         f"{f'{sum(mins) / len(mins):.0f}' if mins else ''} |" + steps_cells(m))
    return "\n".join(lines)


def collapse_table(results):
    """Latent-GRPO and its ablations, per seed: training-time signs of drift."""
    lines = ["| run | seed | pass@1 (%) | #L | eval pass@1 at step 20 / 40 (200 test q.) |"
             " valid fraction, steps 1-10 -> last 10 | latents per rollout | train reward |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        if not name.startswith("latent_grpo") and name != "soft_grpo":
            continue
        for seed, v in m["seeds"].items():
            n = v["steps"]
            def pair(key, fmt="{:.2f}"):
                a, b = v.get(f"{key}_1-10"), v.get(f"{key}_{n - 9}-{n}")
                return f"{fmt.format(a)} -> {fmt.format(b)}" if a is not None and b is not None else ""
            mid = " / ".join(pct(v.get(f"eval_acc@{s}")) for s in (20, 40))
            lines.append(f"| {m['label']} | {seed} | {100 * v['pass@1']:.1f} | {v['mean_L']:.1f} | {mid} | "
                         f"{pair('valid_frac')} | {pair('n_latents', '{:.1f}')} | {pair('reward', '{:.3f}')} |")
    return "\n".join(lines)


def figure(results, out):
    """Accuracy against #L: a panel per task, a colour per start checkpoint (squares, with their
    binomial interval), a marker per method trained from it (mean of seeds, t-interval bars on both
    axes), listed in the legend under its start."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = [(t, title) for t, title in (("toy", "arithmetic toy (GSM8K-Aug format)"),
                                         ("prosqa-toy", "ProsQA-toy (graph reachability)"))
             if any(s["task"] == t for s in results["starts"].values())]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7.5 * len(tasks), 6.5), squeeze=False)
    markers = "ov^D<>PXhp*"
    for ax, (task, title) in zip(axes[0], tasks):
        for i, (sname, s) in enumerate((k, v) for k, v in results["starts"].items() if v["task"] == task):
            c = f"C{i}"
            lo, hi = s["pass@1_ci"]
            ax.errorbar(s["mean_L"], 100 * s["pass@1"], yerr=[[100 * (s["pass@1"] - lo)], [100 * (hi - s["pass@1"])]],
                        fmt="s", color=c, ms=10, capsize=3, mfc="white", mew=2,
                        label=f"{s['label'].split(' (')[0]} (start)")
            for j, m in enumerate(m for m in results["methods"].values() if m["start"] == sname):
                ax.errorbar(m["mean_L"], 100 * m["pass@1"], xerr=m.get("mean_L_ci") or 0,
                            yerr=100 * (m.get("pass@1_ci") or 0), fmt=markers[j % len(markers)], color=c, ms=7,
                            capsize=3, alpha=0.85, label=f"   {m['label']}")
                ax.plot([s["mean_L"], m["mean_L"]], [100 * s["pass@1"], 100 * m["pass@1"]], color=c, lw=0.6, ls=":")
        ax.set_title(title)
        ax.set_xlabel("reasoning length #L (latents + reasoning tokens)")
        ax.set_ylabel(f"greedy pass@1 on {N_TEST} test questions (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.suptitle("open squares: start checkpoints (95% binomial interval); filled: after RL from them, "
                 "mean of seeds (95% t-interval over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_readme(results, readme):
    """The tables between their markers in `readme` (README.md and docs/toy_results.md), where present."""
    text = readme.read_text()
    blocks = {"rl": table(results, "rl"), "prosqa": table(results, "prosqa"), "collapse": collapse_table(results)}
    for name, body in blocks.items():
        a, b = f"<!-- toy_results:{name} -->", f"<!-- /toy_results:{name} -->"
        if a in text and b in text:
            text = text[:text.index(a) + len(a)] + "\n" + body + "\n" + text[text.index(b):]
    readme.write_text(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=2, help="jobs at once (each on one thread)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every method")
    p.add_argument("--only", nargs="*", default=[], help="job names (methods or starts) to run")
    p.add_argument("--collect", action="store_true", help="only collect finished runs")
    p.add_argument("--list", action="store_true", help="list the jobs and whether each is done")
    a = p.parse_args()
    todo = jobs(a.only, a.seeds)
    if a.list:
        for j in todo:
            print(f"{'done' if eval_file(j[2]).is_file() else '    '}  {j[0]}/seed{j[1]}  {' '.join(j[3] or [])}")
        sys.exit(0)
    if not a.collect:
        run_all(todo, a.jobs)
    results = collect(a.seeds)
    # (a fresh clone: nothing to overwrite the tables with)
    if not results["starts"] and not results["methods"]:
        sys.exit(f"error: no finished runs under {RUNS}: run the jobs first (without --collect)")
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "toy_results.json").write_text(json.dumps(results, indent=1))
    figure(results, ROOT / "docs" / "toy_results.png")
    for page in (ROOT / "README.md", ROOT / "docs" / "toy_results.md"):
        write_readme(results, page)
    print(table(results, "rl"), table(results, "prosqa"), collapse_table(results), sep="\n\n")
