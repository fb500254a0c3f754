"""Overlay the training curves of several runs in one figure.

    python scripts/compare_runs.py --out docs/grpo.png --keys reward,eval_acc,completion_length \
        "GRPO on CoT=runs/grpo_cot" "GRPO on Coconut=runs/grpo_coconut"
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="label=run_folder")
    p.add_argument("--keys", default="reward,eval_acc,completion_length")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default=None)
    a = p.parse_args()
    runs = dict(r.split("=", 1) if "=" in r else (Path(r).name, r) for r in a.runs)
    for label, folder in runs.items():
        if not (Path(folder) / "metrics.jsonl").is_file():
            common.die(f"{folder!r} has no metrics.jsonl (not a run folder)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    print(common.plot_runs(runs, a.keys.split(","), a.out, a.title))
