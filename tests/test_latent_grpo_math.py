"""The math of Latent-GRPO, Soft-GRPO and Latent-SFT against hand-computed values."""
import math

import pytest
import torch

import common
import latent_grpo as lg
import latent_sft
import soft_grpo as sg


def f(r):  # the Gumbel log-density, written out for the hand values
    return -r - math.exp(-r)


# ---- one-sided noise ---------------------------------------------------------------------------

def test_one_sided_noise_is_nonnegative_and_the_shift_leaves_the_mixture_unchanged():
    torch.manual_seed(0)
    logits, E = torch.randn(64, 50) * 3, torch.randn(50, 8)
    end = 49
    logits[0, end] = 100.0  # row 0: the noise-free top-1 is </think>, so no noise there
    runs = {}
    for one_sided in (False, True):
        torch.manual_seed(1)
        runs[one_sided] = lg.one_sided_latent(10, 1.0, 1.0, end, one_sided, eps=1e-6)(logits, E)
    (vec2, tok2, rec2), (vec1, tok1, rec1) = runs[False], runs[True]
    l = logits.log_softmax(-1)
    g = rec1["scores"] - l.gather(-1, rec1["ids"])
    assert (g[1:] >= 1e-7).all() and (g[1:] <= 4.5 + 1e-5).all()          # clamp(-1.5, 3) + 1.5 + eps
    assert torch.equal(g[0], torch.zeros(10)) and tok1[0] == end          # no noise where the end is top-1
    assert torch.equal(rec1["ids"], rec2["ids"]) and torch.equal(tok1, tok2)
    assert torch.allclose(vec1, vec2, atol=1e-6)                         # same weights: softmax is shift-invariant
    shift = rec1["scores"][1:] - rec2["scores"][1:]
    assert torch.allclose(shift, torch.full_like(shift, 1.5 + 1e-6), atol=1e-5)
    two_sided_g = rec2["scores"] - l.gather(-1, rec2["ids"])
    assert (two_sided_g[1:] < 0).any()                                   # the unshifted noise goes negative


def test_surrogate_at_the_rollout_policy_is_the_closed_form():
    l = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g = torch.tensor([[0.5, 1.0, 2.0]])
    got = lg.latent_logprob(l, l + g, ste="paper")
    assert got.item() == pytest.approx((f(0.5) + f(1.0) + f(2.0)) / 3, abs=1e-6)   # -1.53658
    assert got.item() == pytest.approx(-1.536585, abs=1e-5)


@pytest.mark.parametrize("ste,adv,grad", [
    ("none", 1.0, -(math.exp(0.5) - 1)),    # crossed (r = -0.5): f's slope flips, so A > 0 pushes l back down
    ("paper", 1.0, math.exp(0.5) - 1),      # the paper negates the margin's gradient: the sign flips back
    ("paper", -1.0, math.exp(0.5) - 1),     # whatever the advantage
    ("code", 1.0, -(math.exp(0.5) - 1)),    # the code leaves A > 0 alone
    ("code", -1.0, -(1 - math.exp(-0.5))),  # and for A <= 0 keeps the sign but bounds the size: f(-r)' = 1 - e^r
])
def test_straight_through_rules_on_a_crossed_target(ste, adv, grad):
    # target s = -1.0, current l = -0.5: r = s - l = -0.5 < 0 (the update went past the target)
    l = torch.tensor([[-0.5]], requires_grad=True)
    out = lg.latent_logprob(l, torch.tensor([[-1.0]]), ste=ste, adv=torch.tensor([adv]))
    assert out.item() == pytest.approx(f(-0.5), abs=1e-6)                # forward value: always f(r)
    out.sum().backward()
    assert l.grad.item() == pytest.approx(grad, abs=1e-5)


def test_uncrossed_targets_are_the_same_under_every_rule():
    l = torch.tensor([[-2.0, -3.0]], requires_grad=True)
    grads = []
    for ste in ("none", "paper", "code"):
        l.grad = None
        lg.latent_logprob(l, torch.tensor([[-1.0, -1.5]]), ste, torch.tensor([-1.0])).sum().backward()
        grads.append(l.grad.clone())
    assert torch.allclose(grads[0], grads[1]) and torch.allclose(grads[0], grads[2])
    assert (grads[0] > 0).all()   # below the target: raising l raises the surrogate


# ---- advantages ---------------------------------------------------------------------------------

def test_invalid_samples_get_zero_advantage_and_leave_the_group_statistics():
    rewards = torch.tensor([1.0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0])
    valid = torch.tensor([True, True, False, True, True, True, True, True, True, False, False, False])
    adv = lg.valid_group_advantages(rewards, valid, 4)
    std = math.sqrt(1 / 3)  # valid rewards of group 0: 1, 0, 0 -> mean 1/3, unbiased std sqrt(1/3)
    assert adv[:4].tolist() == pytest.approx([(2 / 3) / std, -(1 / 3) / std, 0.0, -(1 / 3) / std], abs=1e-4)
    assert adv[4:8].tolist() == pytest.approx([0.866025, 0.866025, -0.866025, -0.866025], abs=1e-4)  # all valid: plain GRPO
    all_valid = lg.valid_group_advantages(rewards, torch.ones(12, dtype=torch.bool), 4)
    assert all_valid[2] != 0                 # without masking the truncated rollout counts


@pytest.mark.parametrize("rule,lone_correct", [("reward", 1 / (1 + 1e-6)), ("zero", 0.0)])
def test_a_lone_valid_rollout_gets_its_reward_or_nothing(rule, lone_correct):
    # group 0: only row 0 finished, and it is correct; group 1: only row 4 finished, and it is wrong;
    # group 2: two valid rollouts, both wrong (std 0)
    rewards = torch.tensor([1.0, 1, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1])
    valid = torch.tensor([True, False, False, False, True, False, False, False, True, True, False, False])
    adv = lg.valid_group_advantages(rewards, valid, 4, single_valid=rule)
    assert adv.tolist() == pytest.approx([lone_correct, 0, 0, 0] + [0.0] * 8, abs=1e-7)
    # the authors' code: mean 0, std 1 for a lone valid rollout; the paper: no signal
    assert (lg.valid_group_advantages(rewards, valid, 4)[0] > 0.99).item()   # default: the authors'


def test_first_token_selection_keeps_only_the_best_correct_rollout():
    G = 4
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -0.5, -0.5, -0.5, -0.5])
    tokens = adv[:, None].repeat(1, 5)
    correct = torch.tensor([True, True, False, True, False, False, False, False])
    valid = torch.tensor([True, True, True, False, True, True, True, True])
    score = torch.tensor([-1.0, -0.5, 0.0, 2.0, 0, 0, 0, 0])  # row 3 scores best but is invalid; row 2 is wrong
    out = lg.first_token_selection(tokens, score, correct, valid, G)
    assert out[:4, 0].tolist() == [0.0, 1.0, 0.0, 0.0]          # only row 1 keeps its first token
    assert torch.equal(out[:, 1:], tokens[:, 1:])               # later tokens untouched
    assert torch.equal(out[4:], tokens[4:])                     # no correct rollout: group untouched


def test_dual_clip_caps_negative_advantages():
    logp, old = torch.log(torch.tensor([[5.0, 5.0, 0.5]])), torch.zeros(1, 3)
    adv = torch.tensor([[-1.0, 1.0, 1.0]])
    loss, _ = lg.ppo_dual_clip_loss(logp, old, adv, 0.2, 0.2, 3.0)
    # A<0, rho 5: max(5, 1.2) = 5, capped at 3; A>0, rho 5: max(-5, -1.2) = -1.2; rho 0.5: max(-0.5, -0.8) = -0.5
    assert loss[0].tolist() == pytest.approx([3.0, -1.2, -0.5])
    loss, _ = lg.ppo_dual_clip_loss(logp, old, adv, 0.2, 0.2, 0.0)
    assert loss[0, 0].item() == pytest.approx(5.0)


# ---- Soft-GRPO -----------------------------------------------------------------------------------

def test_soft_grpo_scores_and_both_densities_match_a_direct_computation():
    torch.manual_seed(0)
    T, k, top_p = 0.6, 5, 0.95
    logits, E = torch.randn(6, 30) * 2, torch.randn(30, 4)
    vec, tok, rec = sg.soft_gumbel_latent(T, k, top_p, 0.1)(logits, E)
    ids, s, keep = rec["ids"], rec["scores"], rec["keep"]
    code = sg.soft_latent_logprob(sg.truncated_logprobs(logits, T, ids, torch.ones_like(keep)), s)
    paper = sg.paper_latent_logprob(sg.truncated_logprobs(logits, T, ids, keep), s, keep)
    gumbel = torch.distributions.Gumbel(0.0, 1.0)
    assert (keep.sum(-1) < k).any()                                       # some rows drop entries (top-p)
    for n in range(6):
        p = torch.softmax(logits[n] / T, -1)[ids[n]]
        kept = keep[n] > 0
        p_roll = torch.where(kept, p / p[kept].sum(), torch.zeros_like(p))  # the rollout's p~ (top-k, top-p)
        g = s[n] - torch.log(p_roll + 1e-6)                                 # the noise it drew: clamped Gumbel
        assert (g >= -1.5 - 1e-5).all() and (g <= 3 + 1e-5).all()
        assert kept[s[n].argmax()] and tok[n] == ids[n, s[n].argmax()]
        # the authors' density: p~ over all k stored ids, noise clamped again, components with log p~ > -3
        lp = torch.log(p / p.sum() + 1e-6)
        dens = [gumbel.log_prob((s[n, j] - lp[j]).clamp(-1.5, 3)) for j in range(k) if lp[j] > -3]
        assert code[n].item() == pytest.approx(float(sum(dens) / len(dens)), abs=1e-5)
        # the paper read literally: p~ over the kept entries, no clamp, the mean over the kept ones
        dens = [gumbel.log_prob(s[n, j] - torch.log(p_roll[j])) for j in range(k) if kept[j]]
        assert paper[n].item() == pytest.approx(float(sum(dens) / len(dens)), abs=1e-5)


def test_soft_grpo_density_at_and_beyond_the_clamp_bounds():
    p = torch.tensor([[0.6, 0.25, 0.11, 0.04]] * 2, dtype=torch.float64)   # log(0.04) < -3: left out
    r = torch.tensor([[-2.0, 3.0, 0.5, 0.5],                              # beyond -1.5, at 3, inside
                      [-1.5, 4.0, 1.0, -5.0]], dtype=torch.float64)       # at -1.5, beyond 3, inside
    scores = torch.log(p + 1e-6) + r
    log_pt = torch.log(p).requires_grad_(True)
    out = sg.soft_latent_logprob(log_pt, scores)
    assert out.tolist() == pytest.approx([(f(-1.5) + f(3.0) + f(0.5)) / 3, (f(-1.5) + f(3.0) + f(1.0)) / 3], abs=1e-9)
    assert out[0].item() == pytest.approx(-2.37934, abs=1e-5)         # (-2.98169 - 3.04979 - 1.10653) / 3
    out.sum().backward()
    shrink = 0.11 / (0.11 + 1e-6)                                      # d log(p~ + 1e-6) / d log p~
    # inside the bounds: d/d log p~ = -f'(r) / 3 with f'(r) = exp(-r) - 1; beyond them, and left out: 0
    g = log_pt.grad
    assert [g[0, 0].item(), g[0, 2].item(), g[0, 3].item()] == pytest.approx([0.0, -(math.exp(-0.5) - 1) / 3 * shrink, 0.0], abs=1e-9)
    assert [g[1, 1].item(), g[1, 2].item(), g[1, 3].item()] == pytest.approx([0.0, -(math.exp(-1.0) - 1) / 3 * shrink, 0.0], abs=1e-9)
    # the paper's formula, unclamped over the same three components: r = -2 counts as f(-2), and its
    # gradient grows like exp(-r) (the "up to 6" difference at the bounds)
    keep = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    log_pt.grad = None
    paper = sg.paper_latent_logprob(log_pt - torch.log(p[:, :3].sum(-1, keepdim=True)), torch.log(p / 0.96) + r, keep)
    assert paper[0].item() == pytest.approx((f(-2.0) + f(3.0) + f(0.5)) / 3, abs=1e-9)
    paper.sum().backward()
    assert log_pt.grad[0, 0].item() == pytest.approx(-(math.exp(2.0) - 1) / 3, abs=1e-9)   # -2.13, vs 0 above


def test_soft_grpo_top_p_keeps_the_smallest_prefix():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.06, 0.03, 0.01]]))
    _, _, rec = sg.soft_gumbel_latent(1.0, 5, 0.9, 0.1)(logits, torch.eye(5))
    assert rec["keep"].tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]    # 0.7 + 0.2 reaches 0.9


# ---- the rollout: recomputed log-probs agree with the rollout; ThinkStep; concatenation ----------------

@pytest.fixture(scope="module")
def think_model():
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    think = common.add_special_tokens(model, tok, [common.START_THINK, common.END_THINK])
    with torch.no_grad():  # rows of their own: copies of "<<" tie its logit exactly, and greedy picks by rounding
        emb = model.get_input_embeddings().weight
        emb[think] = torch.randn(2, emb.shape[1], generator=torch.Generator().manual_seed(0)) * emb.std()
    return model.eval(), tok, think


def _rollout(model, tok, think, latent_fn, max_latent=6, G=3, temperature=1.0):
    qs = ["Tom has 3 apples and buys 4 more. How many?", "Ann has 9 pens and loses 2. How many?"]
    cfg = {"mode": "mixture", "top_k": 10}
    step = common.ThinkStep(model, latent_fn, think[1], max_latent, temperature, 0, 1.0)
    r = common.rollout(model, common.reasoning_prompts(tok, qs, cfg), step, 12, tok.eos_token_id, tok.pad_token_id, G)
    r.extras.update(step.extras())
    return r


def test_recomputed_surrogate_equals_the_rollouts_noise(think_model):
    model, tok, think = think_model
    torch.manual_seed(0)
    r = _rollout(model, tok, think, lg.one_sided_latent(10, 1.0, 1.0, think[1]))
    with torch.no_grad():
        logp, crossed = lg.position_logprobs(model, r, slice(None), 0.6)
        logits = common.completion_logits(model, r, slice(None))
    is_lat = r.kinds == common.LATENT_STEP
    assert is_lat.sum() > 0 and crossed == 0.0
    g = r.extras["scores"] - logits.log_softmax(-1).gather(-1, r.extras["ids"])   # the noise, recovered
    assert (g[is_lat] > -1e-4).all()
    expected = (-g - torch.exp(-g)).mean(-1)
    assert torch.allclose(logp[is_lat], expected[is_lat], atol=1e-4)
    assert torch.allclose(logp[is_lat], (-(g) - torch.exp(-g)).mean(-1)[is_lat])


def _soft_densities(model, tok, think):
    torch.manual_seed(0)
    r = _rollout(model, tok, think, sg.soft_gumbel_latent(0.6, 5, 0.95, 0.1), temperature=0.6)
    with torch.no_grad():
        code = sg.position_logprobs(model, r, slice(None), 0.6)
        paper = sg.position_logprobs(model, r, slice(None), 0.6, "paper")
        logits = common.completion_logits(model, r, slice(None))
    keep = r.extras["keep"]
    p = (logits / 0.6).softmax(-1).gather(-1, r.extras["ids"])
    p_roll = p * keep / (p * keep).sum(-1, keepdim=True).clamp(min=1e-30)
    same = (keep.sum(-1) == 5) & (torch.log(p_roll + 1e-6) > -3).all(-1)   # nothing dropped, nothing below e^-3
    is_lat, answer = ((r.kinds == k) & r.mask.bool() for k in (common.LATENT_STEP, common.TOKEN))
    return code, paper, is_lat & same, is_lat & ~same, answer


def test_soft_grpo_densities_at_the_rollout_policy(think_model):
    """At theta_old the two densities agree on latent tokens whose top-p set dropped nothing and
    whose components all have p~ > e^-3; on the trained toy model's peaked distributions many
    latent tokens get values that differ by up to nats; answer tokens get the same log-probs."""
    trained, tok, _ = common.load_model(common.TOY_LATENT_SFT, torch.device("cpu"), torch.float32)
    think = common.require_tokens(tok, [common.START_THINK, common.END_THINK], "test")
    code, paper, same, other, answer = _soft_densities(think_model[0], think_model[1], think_model[2])
    assert same.sum() > 10 and torch.allclose(code[same], paper[same], atol=1e-4)
    code, paper, same, other, answer = _soft_densities(trained.eval(), tok, think)
    diff = (code - paper).abs()[other]
    assert other.sum() > 10 and (diff > 1e-2).float().mean() > 0.25 and diff.max() > 0.5
    assert answer.any() and torch.equal(code[answer], paper[answer])


def test_think_step_caps_the_latent_span_and_forces_the_end(think_model):
    model, tok, think = think_model
    r = _rollout(model, tok, think, common.mixture_latent(10), max_latent=4, temperature=0.0)
    for i in range(len(r.tokens)):
        kinds = r.kinds[i].tolist()
        n_lat = kinds.count(common.LATENT_STEP)
        assert kinds[:n_lat] == [common.LATENT_STEP] * n_lat and n_lat <= 4      # latents first, at most 4
        assert r.tokens[i, n_lat] == think[1]                                      # then </think>
        assert kinds[n_lat] == (common.FORCED if n_lat == 4 else common.TOKEN)
    # deterministic latents and greedy answers: every rollout of a prompt is the same
    assert torch.equal(r.tokens[0], r.tokens[1]) and torch.equal(r.tokens[3], r.tokens[5])
    torch.manual_seed(0)
    noisy = _rollout(model, tok, think, common.mixture_latent(10, noise_scale=1.0), max_latent=4, temperature=0.0)
    assert not torch.equal(noisy.latents[0], noisy.latents[1])                     # Gumbel-sampled latents differ


def test_select_and_concat_rebuild_the_same_inputs(think_model):
    model, tok, think = think_model
    torch.manual_seed(0)
    a = _rollout(model, tok, think, lg.one_sided_latent(10, 1.0, 1.0, think[1]), G=2)
    b = _rollout(model, tok, think, lg.one_sided_latent(10, 1.0, 1.0, think[1]), max_latent=2, G=2)
    both = common.concat_rollouts([a.select([2, 3]), b], tok.pad_token_id)
    with torch.no_grad():
        la, lb, lab = (lg.position_logprobs(model, x, slice(None), 0.6)[0] for x in (a, b, both))
    m = both.mask.bool()
    assert torch.allclose(lab[:2][m[:2]], la[2:4][a.mask[2:4].bool()], atol=1e-4)
    assert torch.allclose(lab[2:][m[2:]], lb[b.mask.bool()], atol=1e-4)
    assert both.extras["ids"].shape[:2] == both.tokens.shape


# ---- Latent-SFT ---------------------------------------------------------------------------------------

def test_latent_sft_encoder_mask_hides_earlier_markers():
    parts = [([1, 2], [[3, 4], [5]], [6, 0])]
    ids, mask, is_marker, attn = latent_sft.encoder_batch(parts, 9, 0, torch.device("cpu"))
    assert ids[0].tolist() == [1, 2, 3, 4, 9, 5, 9] and is_marker[0].tolist() == [0, 0, 0, 0, 1, 0, 1]
    a = attn[0, 0]
    assert a[6].tolist() == [True, True, True, True, False, True, True]    # the 2nd marker skips the 1st
    assert a[5].tolist() == [True, True, True, True, False, True, False]   # so does the text after it
    assert a[4].tolist() == [True] * 5 + [False, False]                    # a marker sees itself


def test_latent_sft_decoder_and_student_layouts():
    think = (90, 91)
    parts = [([1, 90], [[3, 4], [5, 6], [7]], [8, 0])]
    ids, mask, slot, target = latent_sft.decoder_batch(parts, think, 0, torch.device("cpu"))
    # prompt L1 c3 c4 L2 c5 L3 </think> answer EOS: each latent followed by the next chunk
    assert ids[0].tolist() == [1, 90, 0, 5, 6, 0, 7, 0, 91, 8, 0]
    assert slot[0].tolist() == [0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0]
    assert target[0].tolist() == [0, 0, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    ids, mask, slot, target = latent_sft.student_batch(parts, think, 0, torch.device("cpu"))
    assert ids[0].tolist() == [1, 90, 0, 0, 0, 91, 8, 0] and slot[0].sum() == 3 and target[0].sum() == 3


def test_latent_sft_noisy_labels_and_support_kl():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    torch.manual_seed(0)
    noisy = latent_sft.noisy_soft_labels(q, 0.0, 1.0)
    assert torch.allclose(noisy, q, atol=1e-6)                       # no noise, tau 1: the label itself
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kl = latent_sft.support_kl(q, logits, torch.tensor([[0, 1, 2]]))
    hand = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.25) + 0.1 * math.log(0.1 / 0.15)
    assert kl.item() == pytest.approx(hand, abs=1e-6)


def test_topk_mixture_by_hand():
    E = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    scores = torch.tensor([[0.0, torch.log(torch.tensor(3.0)).item(), -9.0, -8.0]])
    vec, ids, w = common.topk_mixture(scores, E, k=2)
    assert ids.tolist() == [[1, 0]] and torch.allclose(w, torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(vec, torch.tensor([[0.25, 0.75]]))
    _, _, sharp = common.topk_mixture(scores, E, k=2, tau=0.1)   # a lower tau sharpens toward the top-1
    assert sharp[0, 0] > 0.99
