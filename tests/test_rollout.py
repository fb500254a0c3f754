"""The shared KV-cached rollout loop against full recomputes and separate runs."""
import torch

import common
import toy as toy_task


def prompts_of(tok, start, n=3):
    return [common.encode_prompt(tok, ex["question"]) + [start] for ex in toy_task.dataset("test")[:n]]


def feedback_step(n_latents, latent_id, end_id, temperature=0.0):
    """A step function of the Coconut kind, written here for the loop's tests: n_latents steps feed
    the last hidden state back, then end_id is forced, then tokens are sampled."""
    def step(t, logits, hidden, done):
        full = lambda v, dtype=torch.long: torch.full(done.shape, v, dtype=dtype)  # noqa: E731
        if t < n_latents:
            return full(latent_id), hidden, full(common.LATENT_STEP, torch.int8)
        if t == n_latents:
            return full(end_id), None, full(common.FORCED, torch.int8)
        return common.sample_token(logits, temperature), None, full(common.TOKEN, torch.int8)
    return step


def full_recompute_logprobs(model, r):
    """Log-probs of every generated token from one forward over prompt + completion (no cache)."""
    ids, mask, latent_mask, latents = r.inputs()
    logits, _ = common.lm_forward(model, ids, mask, common.positions(mask), latent_mask=latent_mask,
                                  latent_vectors=latents)
    P = r.prompt_ids.shape[1]
    lp = logits[:, P - 1:-1].float().log_softmax(-1).gather(-1, r.tokens[..., None]).squeeze(-1)
    return lp * r.mask, logits[:, P - 1:-1]


@torch.no_grad()
def test_cached_rollout_equals_full_recompute(toy):
    model, tok, (start, end, latent) = toy
    torch.manual_seed(0)
    r = common.rollout(model, prompts_of(tok, start), feedback_step(4, latent, end, temperature=1.0), 24,
                       tok.eos_token_id, tok.pad_token_id, num_generations=2)
    assert (r.kinds[:, :4] == common.LATENT_STEP).all() and (r.kinds[:, 4] == common.FORCED).all()
    assert (r.tokens[:, :4] == latent).all() and r.latents.abs().sum() > 0
    lp, logits = full_recompute_logprobs(model, r)
    assert torch.allclose(lp, r.logprobs, atol=1e-4), (lp - r.logprobs).abs().max()
    # the latent fed at step t is the final hidden state at the position before it
    ids, mask, latent_mask, latents = r.inputs()
    _, hidden = common.lm_forward(model, ids, mask, common.positions(mask), latent_mask=latent_mask,
                                  latent_vectors=latents)
    P = r.prompt_ids.shape[1]
    for t in range(4):
        assert torch.allclose(r.latents[:, t], hidden[:, P - 1 + t], atol=1e-4)


@torch.no_grad()
def test_group_expanded_cache_equals_separate_runs(toy):
    """One prefill repeated G times == prefilling every copy separately (same padding)."""
    model, tok, (start, end, latent) = toy
    prompts = prompts_of(tok, start, 2)
    step = feedback_step(2, latent, end, temperature=0.0)
    grouped = common.rollout(model, prompts, step, 16, tok.eos_token_id, tok.pad_token_id, num_generations=3)
    copies = [p for p in prompts for _ in range(3)]
    separate = common.rollout(model, copies, step, 16, tok.eos_token_id, tok.pad_token_id)
    assert torch.equal(grouped.tokens, separate.tokens)
    assert torch.allclose(grouped.logprobs, separate.logprobs, atol=1e-5)
    assert torch.allclose(grouped.latents, separate.latents, atol=1e-5)
    for i in range(2):  # and a prompt alone (no padding) agrees within float tolerance
        alone = common.rollout(model, [prompts[i]], step, 16, tok.eos_token_id, tok.pad_token_id)
        assert torch.allclose(grouped.latents[3 * i, :2], alone.latents[0, :2], atol=1e-4)


@torch.no_grad()
def test_greedy_cot_rollout_matches_generate(toy):
    model, tok, _ = toy
    prompts = [common.encode_prompt(tok, ex["question"]) for ex in toy_task.dataset("test")[:3]]
    r = common.rollout(model, prompts, common.sampling_step(0.0), 12, tok.eos_token_id, tok.pad_token_id)
    ids, mask = common.pad_left(prompts, tok.pad_token_id)
    from transformers import GenerationConfig
    gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
        max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    assert torch.equal(gen[:, ids.shape[1]:], r.tokens)


@torch.no_grad()
def test_rows_stop_at_eos_independently(toy):
    model, tok, _ = toy
    eos = tok.eos_token_id

    def step(t, logits, hidden, done):  # row 0 ends at step 2, row 1 at step 5, row 2 never
        n = logits.shape[0]
        tokens = torch.full((n,), 5)
        tokens[0] = eos if t == 2 else 5
        tokens[1] = eos if t == 5 else 5
        return tokens, None, torch.zeros(n, dtype=torch.int8)
    r = common.rollout(model, [[3, 4], [3], [4, 4, 4]], step, 8, eos, tok.pad_token_id)
    assert r.lengths.tolist() == [3, 6, 8] and r.finished.tolist() == [True, True, False]
    assert r.mask.sum(1).tolist() == [3, 6, 8]
    assert (r.tokens[0, 3:] == tok.pad_token_id).all() and r.tokens[0, 2] == eos
