"""latent_value_rl.py: the head, its losses and metrics, and where each loss's gradient goes."""
import torch
import torch.nn.functional as F

from latent_value_rl import ValueHead, backward_both, f1_score, roc_auc, value_bce


def test_value_head_shape():
    head = ValueHead(16)
    dims = [(m.in_features, m.out_features) for m in head.net if isinstance(m, torch.nn.Linear)]
    assert dims == [(16, 128), (128, 32), (32, 8), (8, 1)]
    assert head(torch.randn(3, 5, 16)).shape == (3, 5)


def test_bce_with_pos_weight_by_hand():
    # logit 0 -> p 0.5: a positive costs pos_weight * log 2, a negative log 2
    loss = value_bce(torch.zeros(2), torch.tensor([1.0, 0.0]), 20.0)
    assert torch.allclose(loss, torch.tensor((20 * 0.6931472 + 0.6931472) / 2))
    x, y = torch.randn(10), (torch.rand(10) > 0.5).float()
    manual = -(20 * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()
    assert torch.allclose(value_bce(x, y, 20.0), manual, atol=1e-6)


def test_auc_and_f1_by_hand():
    assert roc_auc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([1, 1, 0, 0])) == 1.0
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([1, 0])) == 0.0
    assert roc_auc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == 0.5
    # tp 1, fp 1, fn 1 -> 2 / (2 + 1 + 1)
    assert f1_score(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0])) == 0.5


def test_each_loss_trains_only_its_own_side():
    torch.manual_seed(0)
    head = ValueHead(8)
    head.eval()  # no dropout, so the two computations below are comparable
    lm = torch.nn.Linear(8, 8)                    # stands in for the language model
    x, correct = torch.randn(4, 3, 8), torch.tensor([1.0, 0.0, 1.0, 0.0])
    h = lm(x)
    backward_both(head, h, correct, 20.0, train_head=True)
    lm_grad, head_grad = lm.weight.grad.clone(), [p.grad.clone() for p in head.parameters()]
    # expected: the LM's gradient is the policy loss's alone, the head's the value loss's alone
    lm.zero_grad()
    head.zero_grad()
    (-torch.sigmoid(head(lm(x))).mean()).backward()
    assert torch.allclose(lm.weight.grad, lm_grad)
    head.zero_grad()
    value_bce(head(lm(x).detach()), correct[:, None].expand(-1, 3), 20.0).backward()
    assert all(torch.allclose(p.grad, g) for p, g in zip(head.parameters(), head_grad))
    # frozen head: no gradient reaches it at all
    head.zero_grad(set_to_none=True)
    backward_both(head, lm(x), correct, 20.0, train_head=False)
    assert all(p.grad is None for p in head.parameters())


def test_latent_states_match_the_rollout_without_the_prompt_logits(toy):
    """Phase 2 recomputes the thoughts the greedy rollout fed (with gradients), and computes one row
    of logits per pass, not the whole prompt's (gigabytes at a real vocabulary)."""
    import common
    from latent_value_rl import latent_states, rollout_and_score
    model, tok, _ = toy
    cfg = {"mode": "coconut", "n_latents": 3, "prompt_format": "plain"}
    stored, _, prompts = rollout_and_score(model, tok, common.toy_dataset("test")[:3], cfg, 8, common.stop_ids(model, tok))
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, out: rows.append(out.shape[1]))
    try:
        with torch.no_grad():
            h, anchor = latent_states(model, prompts, 3, tok.pad_token_id, torch.device("cpu"))
    finally:
        hook.remove()
    assert h.shape == stored.shape == (3, 3, model.config.hidden_size)
    assert torch.allclose(h, stored, atol=1e-4), (h - stored).abs().max()
    assert rows == [1, 1, 1] and anchor.item() == 0


def test_auc_and_f1_only_over_both_kinds():
    from latent_value_rl import head_scores
    assert head_scores(torch.tensor([0.2, 0.9]), torch.tensor([0.0, 0.0])) == {}
    assert head_scores(torch.tensor([0.2, 0.9]), torch.tensor([1.0, 1.0])) == {}
    assert head_scores(torch.tensor([0.2, 0.9]), torch.tensor([0.0, 1.0]), "heldout_") == {"heldout_auc": 1.0, "heldout_f1": 1.0}
