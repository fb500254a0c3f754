"""Intermediate checkpoints and exact resumption (common.TrainState, Logger(resume_step=...)).

`train` is a small training run shaped like the RL scripts: the toy model (FSDP2-sharded or in DDP
under torchrun) and a head kept whole on every rank under one AdamW, a cosine schedule with warm-up, a
random.Random choosing the data rows, torch (token noise, dropout), numpy and python random numbers
in the loss, a running baseline kept per rank as script state. Stopping it and resuming must give
the same weights, optimizer state and metrics.jsonl as running straight through.

Run as a script under torchrun (the slow test does) it trains straight, stops and resumes (and
resumes leaving out the random states) in each of 2 processes, and saves the full final states."""
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import toy  # noqa: E402

TOTAL = 4  # the schedule's length: a stopped run plans the same run as a straight one


def train(out, stop=TOTAL, save_steps=0, resume="", limit=None, forget=(), head_size=1, strategy="fsdp"):
    """Train to step `stop` of TOTAL; returns the TrainState, the scheduler and the tokenizer.
    `forget` ("rng", "optimizer") undoes part of what resume() restored: the test that must fail."""
    d = common.setup_distributed(seed=0)
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)  # seeds torch with 0
    head = torch.nn.Linear(model.config.hidden_size, head_size)  # the same on every rank
    gate = torch.nn.Linear(1, 1)  # trained from step 3 on: no optimizer state in checkpoint-2
    torch.manual_seed(1 + d.rank)
    model = common.wrap_model(model, d, strategy)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters(), *gate.parameters()], lr=3e-3,
                                  weight_decay=0.01)
    from transformers import get_cosine_schedule_with_warmup
    scheduler = get_cosine_schedule_with_warmup(optimizer, 2, TOTAL)
    rng = random.Random(0)
    args = SimpleNamespace(output_dir=str(out), save_steps=save_steps, save_total_limit=limit,
                           resume_from_checkpoint=resume, save_dtype="float32")
    state = common.TrainState(args, d, {"model": model, "head": head, "gate": gate}, [optimizer], [scheduler], [rng])
    start, extra = state.resume()
    if "rng" in forget:
        common.setup_distributed(seed=0)
        rng.seed(0)
    if "optimizer" in forget:
        optimizer.state.clear()
    logger = common.Logger(out, args, d, resume_step=start)
    logger.log({"eval": 0.5}, 0, quiet=True)  # a step-0 evaluation, logged again by a resumed run
    baseline = extra.get("baseline", 0.0)
    data = [ex["question"] for ex in toy.dataset("train", 64)]
    model.train()
    for step in range(start + 1, stop + 1):
        enc = tok([data[i] for i in rng.sample(range(len(data)), 4)[d.rank::d.world]], return_tensors="pt",
                  padding=True)
        ids = enc.input_ids
        noisy = torch.where(torch.rand(ids.shape) < 0.2, torch.randint_like(ids, 2, 20), ids)
        res = model(noisy, attention_mask=enc.attention_mask, output_hidden_states=True)
        h = F.dropout(res.hidden_states[-1][:, -1], 0.2)
        weight = 1 + np.random.rand() + random.random()
        loss = (F.cross_entropy(res.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
                + weight * (head(h) - baseline).pow(2).mean())
        if step > 2:
            loss = loss + gate(h[:, :1]).pow(2).mean()
        loss.backward()
        common.average_gradients([head, gate], d)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        baseline = 0.9 * baseline + 0.1 * loss.item()  # differs per rank
        logger.log({"loss": common.all_reduce(loss.item(), d), "lr": scheduler.get_last_lr()[0]}, step, quiet=True)
        common.write_completions(out, step, [{"completion": data[0], "reward": baseline}], d)
        state.maybe_save(step, tok, {"mode": "cot"}, extra={"baseline": baseline}, extra_modules={"head": head})
    return SimpleNamespace(state=state, scheduler=scheduler, tok=tok)


def full_state(run):
    """Every weight and optimizer tensor of a `train` run, gathered whole (a collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(run.state.modules, run.state.optimizers,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) and all(assert_same(x, y) is None for x, y in zip(a, b))
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def same_run(f):
    """A jsonl file's rows without the process's peak memory (which is not the run's)."""
    return [{k: v for k, v in json.loads(x).items() if k != "peak_mem_gb"} for x in f.read_text().splitlines()]


def test_a_stopped_and_resumed_run_continues_exactly(tmp_path):
    straight = train(tmp_path / "straight")
    train(tmp_path / "run", stop=3, save_steps=2)  # stops after step 3: its last checkpoint is at 2
    assert [r["step"] for r in rows(tmp_path / "run")] == [0, 1, 2, 3]
    resumed = train(tmp_path / "run", resume="latest")
    assert_same(full_state(resumed), full_state(straight))
    assert "gate.bias" in full_state(straight)[1]["state"]  # trained after the checkpoint only
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    for f in ("metrics.jsonl", "completions.jsonl"):
        assert same_run(tmp_path / "run" / f) == same_run(tmp_path / "straight" / f)
    assert [r["step"] for r in rows(tmp_path / "run")] == [0, 1, 2, 3, 4]   # step 3 once, step 0 once
    # the test can fail: a resume that left out the random states or the optimizer ends elsewhere
    for forget in ("rng", "optimizer"):
        run = train(tmp_path / forget, resume=str(tmp_path / "run" / "checkpoint-2"), forget=(forget,))
        with pytest.raises(AssertionError):
            assert_same(full_state(run)[0], full_state(straight)[0])


def test_save_total_limit_latest_and_the_final_save(tmp_path, capsys):
    out = tmp_path / "run"
    run = train(out, stop=4, save_steps=1, limit=3)
    assert sorted(common.checkpoints(out)) == [2, 3, 4] and not list(out.glob("*.tmp"))
    latest = train(out, resume="latest")
    assert latest.scheduler.last_epoch == 4 and latest.state.checkpoint() == (out / "checkpoint-4", 4)
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in capsys.readouterr().out
    # resumed from 2, saving 3 again: checkpoint-4 of the abandoned run counts as the oldest
    train(out, stop=3, resume=str(out / "checkpoint-2"), save_steps=1, limit=2)
    assert sorted(common.checkpoints(out)) == [2, 3]
    common.save_checkpoint(run.state.modules["model"], run.tok, out, {"mode": "cot"})  # the final save keeps them
    assert sorted(common.checkpoints(out)) == [2, 3] and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("*.old"))


def test_a_checkpoint_folder_is_a_normal_model_folder(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    run = train(tmp_path / "run", stop=2, save_steps=2)
    model, head = run.state.modules["model"], run.state.modules["head"]
    ckpt = tmp_path / "run" / "checkpoint-2"
    plain = AutoModelForCausalLM.from_pretrained(ckpt)
    assert_same({k: v for k, v in plain.state_dict().items() if k != "lm_head.weight"},
                {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})
    loaded, _, cfg = common.load_model(str(ckpt), torch.device("cpu"))  # eval.py's way in
    assert cfg == {"mode": "cot"} and torch.equal(loaded.model.norm.weight, model.model.norm.weight)
    assert_same(load_file(ckpt / "head.safetensors"), head.state_dict())
    assert (ckpt / "training_state" / ".metadata").is_file() and (ckpt / "training_state" / "rank-0.pt").is_file()


def error(**kw):
    with pytest.raises(SystemExit) as e:
        train(**kw)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_bad_input_is_one_line(tmp_path):
    assert "--save_steps and --save_total_limit must be >= 0" in error(out=tmp_path / "a", save_steps=-1)
    assert "no such folder" in error(out=tmp_path / "a", resume=str(tmp_path / "nowhere"))
    assert "has no checkpoint-<step> folder" in error(out=tmp_path / "a", resume="latest")
    train(tmp_path / "run", stop=1, save_steps=1)
    assert "no training_state/" in error(out=tmp_path / "a", resume=str(tmp_path / "run"))  # the run folder itself
    assert "does not fit this run's modules" in error(out=tmp_path / "a", resume=str(tmp_path / "run" / "checkpoint-1"),
                                                      head_size=2)
    ts = tmp_path / "run" / "checkpoint-1" / "training_state"
    (ts / "rank-1.pt").write_bytes((ts / "rank-0.pt").read_bytes())
    assert "saved by 2 processes and this run has 1" in error(out=tmp_path / "a", resume=str(ts.parent))


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_process_resume_continues_exactly(tmp_path, strategy):
    from conftest import ROOT, run_script
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(29537 + (strategy == "ddp")),
               ROOT / "tests" / "test_resume.py", tmp_path, strategy, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    straight, resumed, forgot = (torch.load(tmp_path / f"{name}.pt") for name in ("straight", "resumed", "forgot"))
    assert_same(resumed, straight)
    with pytest.raises(AssertionError):  # each rank's own random states matter
        assert_same(forgot[0], straight[0])
    assert same_run(tmp_path / "run" / "metrics.jsonl") == same_run(tmp_path / "straight" / "metrics.jsonl")
    assert len(list((tmp_path / "run" / "checkpoint-2" / "training_state").glob("rank-*.pt"))) == 2


if __name__ == "__main__":  # under torchrun: see the module's docstring
    import os
    torch.set_num_threads(1)
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    for name, kw in [("straight", {}), ("stopped", dict(stop=3, save_steps=2)), ("resumed", dict(resume="latest")),
                     ("forgot", dict(resume=str(out / "run" / "checkpoint-2"), forget=("rng",)))]:
        final = full_state(train(out / {"straight": "straight", "forgot": "forgot"}.get(name, "run"),
                                 strategy=strategy, **kw))
        if torch.distributed.get_rank() == 0 and name != "stopped":
            torch.save(final, out / f"{name}.pt")
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as dist_worker.py: no gloo teardown
