"""ATP-Latent (atp_latent.py): the VAE's KL and log-density, the coherence score, the stop head's
decision every c_thought latents, and 2-step runs of both phases with eval.py on the result."""
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import atp_latent
import common
from conftest import one_line_error, main_error, run_script

FAST = ["--steps_per_stage", "2", "--sft_batch_size", "8", "--micro_batch_size", "8", "--max_train_samples", "64",
        "--max_steps", "2", "--train_batch_size", "4", "--mini_batch_size", "2", "--num_generations", "4",
        "--max_eval_samples", "6", "--max_completion_length", "32", "--max_step_tokens", "16", "--eval_every", "100",
        "--log_every", "1"]


def finite(rows, keys):
    return all(r[k] == r[k] and abs(r[k]) < 1e6 for r in rows for k in keys if k in r)


# ----------------------------------------------------------------------------------------------
# the math

def test_vae_kl_equals_its_closed_form():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 16), torch.randn(5, 16)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(atp_latent.gaussian_kl(mu, logvar), expected, atol=1e-5)
    by_hand = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)
    assert torch.allclose(atp_latent.gaussian_kl(mu, logvar), by_hand)
    assert atp_latent.gaussian_kl(torch.zeros(3, 8), torch.zeros(3, 8)).abs().max() == 0   # q = prior


def test_gaussian_logprob_of_a_sampled_latent_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 32), torch.randn(4, 32).clamp(-3, 2)
    z = atp_latent.sample_latent(mu, logvar)
    sigma = (0.5 * logvar).exp()
    expected = torch.distributions.Normal(mu, sigma).log_prob(z).sum(-1)
    assert torch.allclose(atp_latent.gaussian_logprob(z, mu, logvar), expected, atol=1e-4)
    mvn = torch.distributions.MultivariateNormal(mu, torch.diag_embed(sigma ** 2))
    assert torch.allclose(atp_latent.gaussian_logprob(z, mu, logvar), mvn.log_prob(z), atol=1e-3)
    # the reparameterised sample has the head's mean and spread
    big = atp_latent.sample_latent(torch.full((20000, 1), 2.0), torch.full((20000, 1), 2 * torch.log(torch.tensor(0.5))))
    assert abs(big.mean().item() - 2.0) < 0.02 and abs(big.std().item() - 0.5) < 0.02


def test_coherence_score_on_hand_built_steps():
    score = atp_latent.coherence_score
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
    assert atp_latent.parse_step("<<600*30/100=180>>") == ([600.0, 30.0, 100.0], 180.0)
    assert atp_latent.has_format("<<1+1=2>>\n### 2", True) and not atp_latent.has_format("### 2", False)
    assert not atp_latent.has_format("the answer is 2", True)


def test_loss_is_a_per_rollout_mean_of_latents_plus_one_of_the_answer():
    per_pos = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [2.0, 4.0, 6.0, 8.0, 10.0]])
    is_lat = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    is_ans = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
    # row 0: (1 + 2) / 2 + (3 + 4) / 2 = 5; row 1: 2 / 1 + (4 + 6 + 8 + 10) / 4 = 9 (a token-mean would give 3.75)
    assert atp_latent.sequence_loss(per_pos, is_lat, is_ans).tolist() == [5.0, 9.0]
    no_latents = atp_latent.sequence_loss(per_pos, torch.zeros_like(is_lat), is_ans)
    assert no_latents.tolist() == [3.5, 7.0]                             # an empty part adds 0


def test_stop_targets_every_c_thought_latents():
    checked, label = atp_latent.stop_targets(torch.tensor([4, 6, 2]), 6, 2)
    assert checked.tolist() == [[False, True, False, True, False, False],
                                [False, True, False, True, False, True],
                                [False, True, False, False, False, False]]
    assert label[checked].tolist() == [0, 1, 0, 0, 1, 1]               # stop after the row's last pair only


class FixedStop(torch.nn.Module):
    """A stop head whose decision is the sign of the hidden state's first coordinate."""

    def forward(self, h):
        return torch.stack([-h[:, 0], h[:, 0]], -1) * 100


def make_step(c, max_latents, tok, sample=False):
    heads = atp_latent.ATPHeads(8)
    heads.stop = FixedStop()
    model = SimpleNamespace(atp_heads=heads)
    return atp_latent.ATPStep(model, {"c_thought": c, "max_latents": max_latents}, tok, sample=sample), heads


@pytest.mark.parametrize("c", [2, 3])
def test_stop_head_decides_only_every_c_thought_latents(toy, c):
    _, tok, (start, end, latent) = toy
    step, _ = make_step(c, 4 * c, tok)
    done = torch.zeros(2, dtype=torch.bool)
    wants_stop = torch.tensor([[1.0] + [0.0] * 7, [-1.0] + [0.0] * 7])   # row 0's head says stop, row 1's continue
    kinds = []
    for t in range(4 * c + 2):
        tokens, vec, k = step(t, torch.zeros(2, 5), wants_stop, done)
        kinds.append(k)
        assert vec.shape == (2, 8)
    kinds = torch.stack(kinds, 1)
    check = step.extras()["check"]
    # row 0: c latents, then the stop (a scored end, check 2) at t = c
    assert (kinds[0, :c] == common.LATENT_STEP).all() and kinds[0, c] == common.FORCED and check[0, c] == 2
    assert (check[0, :c] == 0).all()
    # row 1: continues at every check (t = c, 2c, 3c), forced to end (unscored) at max_latents
    assert (kinds[1, :4 * c] == common.LATENT_STEP).all() and kinds[1, 4 * c] == common.FORCED
    assert [t for t in range(4 * c + 1) if check[1, t] == 1] == [c, 2 * c, 3 * c] and check[1, 4 * c] == 0


def test_atp_step_in_a_rollout_stops_on_the_boundary(toy):
    model, tok, _ = toy
    heads = atp_latent.ATPHeads(model.config.hidden_size)
    with torch.no_grad():   # stop head: always "stop"
        heads.stop.net[2].weight.zero_()
        heads.stop.net[2].bias.copy_(torch.tensor([0.0, 10.0]))
    atp_latent.attach_heads(model, heads)
    cfg = {"mode": "atp", "c_thought": 2, "max_latents": 6}
    prompts = common.reasoning_prompts(tok, ["Tom has 3 boxes of 4 pens.", "Ann has 2 eggs."], cfg)
    step = common.reasoning_step(cfg, tok, 1.0, model=model)
    step.sample = True
    r = common.rollout(model, prompts, step, 10, tok.eos_token_id, tok.pad_token_id, num_generations=3)
    n_lat = ((r.kinds == common.LATENT_STEP) & r.mask.bool()).sum(1)
    assert (n_lat == 2).all() and (step.extras()["check"][:, 2] == 2).all()
    lat = atp_latent.rollout_latents(r)
    assert all(v.shape == (2, model.config.hidden_size) for v in lat)
    assert not torch.allclose(lat[0], lat[1])                              # sampled: the G rollouts differ
    del common.unwrap(model).atp_heads


# ----------------------------------------------------------------------------------------------
# end to end

@pytest.fixture(scope="module")
def atp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "atp"
    run_script("atp_latent.py", *FAST, "--log_completions", "--output_dir", out)
    return out


def test_both_phases_run_save_and_reload(atp_run):
    out = atp_run
    rows = common.read_metrics(out / "metrics.jsonl")
    sft = [r for r in rows if r.get("phase") == "sft" and "ce" in r]
    rl = [r for r in rows if r.get("phase") == "rl" and "loss" in r]
    assert [r["stage"] for r in sft] == [1, 1, 2, 2, 3, 3, 4, 4] and len(rl) == 2
    assert finite(sft, ["ce", "dec_ce", "kl", "stop_ce", "grad_norm"]) and finite(rl, ["loss", "reward", "grad_norm", "sigma"])
    assert all(r["kl"] > 0 and r["sigma"] > 0 for r in sft) and all(0 <= r["coherence"] <= 1 for r in rl)
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "atp" and cfg["phase"] == "rl" and cfg["c_thought"] == 2 and cfg["max_latents"] == 6
    assert json.loads((out.parent / "atp-sft" / "latent_config.json").read_text())["phase"] == "sft"
    for f in ("vae_head.safetensors", "stop_head.safetensors", "decoder/model.safetensors", "curves.png", "completions.jsonl"):
        assert (out / f).is_file(), f
    assert not (out.parent / "atp.tmp").exists()
    AutoModelForCausalLM.from_pretrained(out)                              # plain transformers loads the LM ...
    AutoModelForCausalLM.from_pretrained(out / "decoder")                  # ... and the decoder
    assert common.LATENT in AutoTokenizer.from_pretrained(out).get_vocab()
    model, tok, cfg = common.load_model(str(out), torch.device("cpu"), torch.float32)
    atp_latent.load_extras(model, out, cfg)
    assert cfg["mode"] == "atp" and isinstance(model.atp_heads, atp_latent.ATPHeads)
    assert "atp_heads" not in " ".join(model.state_dict())                # the heads stay out of the LM's weights
    line = json.loads((out / "completions.jsonl").read_text().splitlines()[0])
    assert isinstance(line["decoded_latents"], list)


def test_eval_runs_the_checkpoint_and_shows_latents(atp_run, tmp_path):
    p = run_script("eval.py", "--model", atp_run, "--max_samples", "4", "--num_samples", "2", "--show", "2",
                   "--show_latents", "--max_completion_length", "32", "--output_file", tmp_path / "e.json")
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["mode"] == "atp" and 0 <= res["pass@1"] <= res["pass@2"] <= 1 and res["mean_L"] >= 2
    assert p.stdout.count("latents read as:") == 2 and "| atp |" in p.stdout


def test_rl_phase_high_lr_step_trains_lm_and_heads_not_the_decoder(atp_run, tmp_path):
    out = tmp_path / "rl"
    run_script("atp_latent.py", "--phase", "rl", "--model", atp_run, *FAST, "--max_steps", "1", "--mini_batch_size", "4",
               "--learning_rate", "1e-2", "--output_dir", out)
    for f in ("model.safetensors", "vae_head.safetensors", "stop_head.safetensors"):
        before, after = load_file(atp_run / f), load_file(out / f)
        for name, w in before.items():
            assert not torch.allclose(after[name], w), f"{f}: {name} did not change"
    dec_before, dec_after = load_file(atp_run / "decoder/model.safetensors"), load_file(out / "decoder/model.safetensors")
    assert all(torch.equal(dec_before[n], dec_after[n]) for n in dec_before)  # frozen in RL


def test_sft_high_lr_step_trains_lm_heads_and_decoder(tmp_path):
    out = tmp_path / "sft"
    run_script("atp_latent.py", "--phase", "sft", *FAST, "--start_stage", "4", "--steps_per_stage", "1",
               "--sft_learning_rate", "1e-2", "--max_eval_samples", "2", "--output_dir", out)
    before = load_file(f"{common.TOY_COT}/model.safetensors")
    for sub in ("model.safetensors", "decoder/model.safetensors"):
        after = load_file(out / sub)
        for name, w in before.items():
            new = after[name][: w.shape[0]] if "embed" in name else after[name]
            assert not torch.allclose(new, w), f"{sub}: {name} did not change"
    vae = load_file(out / "vae_head.safetensors")
    assert vae["logvar.bias"].mean().item() != -4.0 and (vae["logvar.weight"] != 0).any()


@pytest.mark.parametrize("argv,words", [
    (["--phase", "both"], "--phase must be sft, rl or empty"),
    (["--phase", "rl"], "--phase rl needs an ATP-Latent checkpoint"),
    (["--num_generations", "1"], "--num_generations must be at least 2"),
    (["--c_thought", "0"], "--c_thought must be at least 1"),
])
def test_bad_input_is_one_line(argv, words, tmp_path):
    assert words in main_error("atp_latent", *argv, "--output_dir", tmp_path / "x")


def test_bad_input_from_the_command_line(tmp_path):
    one_line_error(run_script("atp_latent.py", "--c_thought", "0", "--output_dir", tmp_path / "x", ok=False, timeout=120),
                   "--c_thought must be at least 1")


def test_show_latents_needs_an_atp_checkpoint(tmp_path):
    p = run_script("eval.py", "--model", common.TOY_COCONUT, "--max_samples", "2", "--show_latents",
                   "--output_file", tmp_path / "e.json", ok=False)
    one_line_error(p, "--show_latents needs a checkpoint with a latent decoder")


def test_two_process_atp_latent(tmp_path):
    """torchrun, 2 CPU processes, both phases (SFT then RL) under FSDP2: the ranks end with identical weights."""
    from conftest import ROOT
    out = tmp_path / "atp"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29525",
               ROOT / "tests" / "dist_worker.py", "atp_latent", *FAST, "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert rows and all(r["reward"] == r["reward"] for r in rows)
