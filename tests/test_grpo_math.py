"""grpo_latent.py's math against hand-computed values."""
import pytest
import torch

import common
from grpo_latent import aggregate, clipped_token_loss, group_advantages, k3_kl


def test_group_advantages_by_hand():
    # one right out of four: mean 0.25, unbiased std 0.5 -> (1.5, -0.5, -0.5, -0.5)
    a = group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, eps=0.0)
    assert torch.allclose(a, torch.tensor([1.5, -0.5, -0.5, -0.5]))
    a = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    assert torch.allclose(a[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))                                  # all-equal group: no signal
    assert torch.allclose(group_advantages(torch.tensor([1.0, 0, 0, 0]), 4, scale_rewards=False),
                          torch.tensor([0.75, -0.25, -0.25, -0.25]))


def test_clipping_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))     # ratios 1.5, 0.5, 1.1 against old = 0
    old = torch.zeros(1, 3)
    pos, _ = clipped_token_loss(logp, old, torch.tensor([2.0]), 0.2, 0.2)
    assert torch.allclose(pos, torch.tensor([[-2 * 1.2, -2 * 0.5, -2 * 1.1]]))  # gain capped above at 1+eps
    neg, _ = clipped_token_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.3)
    assert torch.allclose(neg, torch.tensor([[1.5, 0.8, 1.1]]))               # loss floored below at 1-eps
    _, ratio = clipped_token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    assert torch.allclose(ratio, torch.tensor([[1.5, 0.5, 1.1]]))


def test_k3_kl():
    x = torch.randn(3, 5)
    assert torch.equal(k3_kl(x, x), torch.zeros(3, 5))
    # new = log 0.5, ref = log 0.25: d = log 0.5 -> 0.5 - log 0.5 - 1
    v = k3_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    assert torch.allclose(v, torch.tensor([0.5 - torch.log(torch.tensor(0.5)).item() - 1]))
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_aggregations_by_hand():
    per_tok = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert aggregate(per_tok, mask, "token-mean", 4, 2).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(per_tok, mask, "seq-mean-token-mean", 4, 2).item() == pytest.approx((2 + 4) / 2)
    # split into two micro-batches, the shares add up to the whole
    whole = aggregate(per_tok, mask, "seq-mean-token-mean", 4, 2)
    parts = aggregate(per_tok[:1], mask[:1], "seq-mean-token-mean", 4, 2) + aggregate(per_tok[1:], mask[1:], "seq-mean-token-mean", 4, 2)
    assert torch.allclose(whole, parts)


def test_latent_positions_get_no_gradient_from_the_policy_loss(toy):
    """The stored latent vectors are inputs: the loss's gradient w.r.t. them is zero (detached),
    and latent/forced positions carry no loss term."""
    model, tok, (start, end, latent) = toy
    prompts = [common.encode_prompt(tok, ex["question"]) + [start] for ex in common.toy_dataset("test")[:2]]
    torch.manual_seed(0)
    r = common.rollout(model, prompts, common.coconut_step(3, latent, end, temperature=1.0), 12, tok.eos_token_id,
                       tok.pad_token_id, num_generations=2)
    r.latents = r.latents.clone().requires_grad_(True)
    loss_mask = ((r.kinds == common.TOKEN) & r.mask.bool()).float()
    assert loss_mask[:, :4].sum() == 0 and loss_mask[:, 4:].sum() > 0
    logp = common.gather_logprobs(common.completion_logits(model, r), r.tokens)
    per_tok, _ = clipped_token_loss(logp, logp.detach(), torch.tensor([1.0, -1.0, 0.5, 2.0]), 0.2, 0.2)
    aggregate(per_tok, loss_mask, "token-mean", loss_mask.sum(), 4).backward()
    assert r.latents.grad is None                                  # fed back detached
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    # and with the latents not detached, the loss would reach them through the answer tokens
    logp = common.gather_logprobs(common.completion_logits(model, r, detach_latents=False), r.tokens)
    (logp * loss_mask).sum().backward()
    assert r.latents.grad[:, :3].abs().sum() > 0
    model.zero_grad()
