"""torchrun with 2 CPU processes (gloo): FSDP2 and DDP end with the same weights on every rank,
and the same weights as one process training on the same global batches."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script

ARGS = ["--model", "toy", "--start_stage", "0", "--end_stage", "1", "--max_latent_stage", "1", "--max_steps", "2",
        "--train_batch_size", "8", "--micro_batch_size", "4", "--max_train_samples", "32", "--max_eval_samples", "8",
        "--max_completion_length", "8", "--learning_rate", "1e-4", "--log_every", "1"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_script("coconut_sft.py", *ARGS, "--output_dir", out)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_process_run_matches_one_process(strategy, single, tmp_path):
    out = tmp_path / strategy
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517" if strategy == "fsdp" else "29518",
               ROOT / "tests" / "dist_worker.py", "coconut_sft", *ARGS, "--distributed", strategy, "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]   # ranks agree exactly
    multi = load_file(out / "model.safetensors")
    assert set(multi) == set(single)   # the tied head is not saved a second time from FSDP2's gathered state
    for name, w in single.items():  # and agree with one process on the same global batches
        assert torch.allclose(multi[name], w, atol=3e-5), (name, (multi[name] - w).abs().max())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)


def test_two_process_grpo_latent_fsdp2_bf16(tmp_path):
    """FSDP2 with bf16 compute (MixedPrecisionPolicy) on fp32 shards, and a bf16 reference model."""
    out = tmp_path / "grpo"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
               ROOT / "tests" / "dist_worker.py", "grpo_latent", "--max_steps", "2", "--train_batch_size", "4",
               "--mini_batch_size", "2", "--num_generations", "4", "--max_eval_samples", "8", "--max_completion_length", "40",
               "--beta", "0.04", "--bf16", "true", "--output_dir", out, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.float32}  # toy: published fp32
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 2 and all(r["kl"] == r["kl"] for r in rows if "kl" in r)
