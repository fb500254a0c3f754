"""atp_sft.py (ATP-Latent's SFT, and mode "atp" as eval.py runs it): the VAE's KL, the stop head's
targets and its decision every c_thought latents, the chat prompts, a 4-stage run with eval.py
--show_latents on the result, a high-lr step that moves the LM, heads and decoder, torchrun, and
the scale features: log-probs without whole logits against the old forward, gradient
checkpointing of the latent passes, LoRA, and resuming a stopped run in mid-stage and between stages."""
import dataclasses
import json
import re
import shlex
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import atp_rl
import atp_sft
import common
import toy as toy_task
from conftest import ROOT, main_error, one_line_error, run_script

FAST = ["--steps_per_stage", "2", "--train_batch_size", "8", "--micro_batch_size", "8", "--max_train_samples", "64",
        "--max_eval_samples", "6", "--max_completion_length", "32", "--log_every", "1"]


def finite(rows, keys):
    return all(r[k] == r[k] and abs(r[k]) < 1e6 for r in rows for k in keys if k in r)


def run_main(module, *argv):
    """A script's main() in this process, as its command line would call it (no interpreter start-up)."""
    return module.main(common.parse_args(module.Args, [str(a) for a in argv]))


# ----------------------------------------------------------------------------------------------
# the math

def test_vae_kl_equals_its_closed_form():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 16), torch.randn(5, 16)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(atp_sft.gaussian_kl(mu, logvar), expected, atol=1e-5)
    by_hand = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(-1)
    assert torch.allclose(atp_sft.gaussian_kl(mu, logvar), by_hand)
    assert atp_sft.gaussian_kl(torch.zeros(3, 8), torch.zeros(3, 8)).abs().max() == 0   # q = prior


def test_stop_targets_every_c_thought_latents():
    checked, label = atp_sft.stop_targets(torch.tensor([4, 6, 2]), 6, 2)
    assert checked.tolist() == [[False, True, False, True, False, False],
                                [False, True, False, True, False, True],
                                [False, True, False, False, False, False]]
    assert label[checked].tolist() == [0, 1, 0, 0, 1, 1]               # stop after the row's last pair only


class FixedStop(torch.nn.Module):
    """A stop head whose decision is the sign of the hidden state's first coordinate."""

    def forward(self, h):
        return torch.stack([-h[:, 0], h[:, 0]], -1) * 100


def make_step(c, max_latents, tok, sample=False):
    heads = atp_sft.ATPHeads(8)
    heads.stop = FixedStop()
    model = SimpleNamespace(atp_heads=heads)
    return atp_sft.ATPStep(model, {"c_thought": c, "max_latents": max_latents}, tok, sample=sample), heads


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


def test_reasoning_is_greedy_and_atp_rl_reasons_the_same(toy):
    """Mode "atp" as eval.py runs it (atp_sft.reasoning): the prompt ends with <|start-latent|>, z = mu,
    the stop head's argmax; atp_rl.py's copy of it gives the same rollout."""
    model, tok, (start, _, _) = toy
    torch.manual_seed(0)
    heads = atp_sft.attach_heads(model, atp_sft.ATPHeads(model.config.hidden_size))
    cfg = {"mode": "atp", "prompt_format": "plain", "system_prompt": "", "c_thought": 2, "max_latents": 6}
    questions = ["Tom has 3 boxes of 4 pens.", "Ann has 2 eggs."]
    try:
        prompts, step = atp_sft.reasoning(model, tok, cfg)
        assert prompts(questions) == [common.encode_prompt(tok, q) + [start] for q in questions]
        assert not step.sample                                              # temperature 0: mean latents, argmax stop
        r = common.rollout(model, prompts(questions), step, 12, tok.eos_token_id, tok.pad_token_id)
        rl_prompts, rl_step = atp_rl.reasoning(model, tok, cfg)
        r2 = common.rollout(model, rl_prompts(questions), rl_step, 12, tok.eos_token_id, tok.pad_token_id)
        assert torch.equal(r.tokens, r2.tokens) and torch.equal(r.latents, r2.latents)
        with torch.no_grad():                                               # greedy: the latents are the VAE's means
            ids, mask = common.pad_left(prompts(questions), tok.pad_token_id)
            mu, _ = heads.vae(common.lm_forward(model, ids, mask, common.positions(mask))[1][:, -1])
        assert torch.allclose(r.latents[:, 0], mu, atol=1e-5)
        assert atp_sft.reasoning(model, tok, cfg, temperature=1.0)[1].sample   # sampled pass@k: sampled latents
    finally:
        del common.unwrap(model).atp_heads


def test_atp_sft_prompts_are_the_chat_prompts_of_rl_and_eval(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    special = common.add_special_tokens(model, tok, [atp_sft.START_LATENT, atp_sft.END_LATENT, atp_sft.LATENT])
    cfg = {"mode": "atp", "prompt_format": "chat", "system_prompt": "Think, then write #### and the answer."}
    args = SimpleNamespace(c_thought=2, max_latent_stage=3)
    ex = {"question": "Tom has 3 boxes of 4 pens. How many pens?", "steps": ["<<3*4=12>>"], "answer": "12"}
    example = atp_sft.build_example(tok, ex, 1, args, special, cfg)
    assert example.prompt == atp_sft.encode_prompts(tok, [ex["question"]], cfg)[0]
    assert example.prompt == atp_rl.encode_prompts(tok, [ex["question"]], cfg)[0]
    text = tok.decode(example.prompt)
    assert text.startswith("<|im_start|>system\nThink, then write #### and the answer.") and text.endswith(
        "<|im_start|>assistant\n" + atp_sft.START_LATENT)
    assert example.n_latent == 2 and example.tail[:3] == [special[2], special[2], special[1]]
    assert len(example.targets) == 1


def test_curriculum_example_by_hand(toy):
    """Stage 1 of a 2-step example: its first step becomes c_thought latents (the decoder's target),
    the second stays text; past max_latent_stage every step is gone."""
    _, tok, special = toy
    start, end, latent = special
    args = SimpleNamespace(c_thought=2, max_latent_stage=1)
    cfg = {"prompt_format": "plain", "system_prompt": ""}
    ex = {"question": "Q?", "steps": ["<<3*4=12>>", "<<12+2=14>>"], "answer": "14"}
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    e = atp_sft.build_example(tok, ex, 1, args, special, cfg)
    assert e.prompt == enc("Q?\n") + [start] and e.n_latent == 2
    assert e.tail == [latent, latent, end] + enc("<<12+2=14>>\n") + enc("### 14") + [tok.eos_token_id]
    assert e.labels == [-100] * 3 + e.tail[3:] and e.targets == [enc("<<3*4=12>>") + [tok.eos_token_id]]
    e2 = atp_sft.build_example(tok, ex, 2, args, special, cfg)
    assert e2.n_latent == 2 and e2.tail == [latent, latent, end] + enc("### 14") + [tok.eos_token_id]


# ----------------------------------------------------------------------------------------------
# end to end

@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "atp_sft"
    run_script("atp_sft.py", *FAST, "--output_dir", out)
    return out


@pytest.mark.slow
def test_sft_runs_saves_and_reloads(sft_run):
    out = sft_run
    rows = common.read_metrics(out / "metrics.jsonl")
    sft = [r for r in rows if r.get("phase") == "sft" and "ce" in r]
    assert [r["stage"] for r in sft] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert [r["stage"] for r in rows if "eval_acc" in r] == [1, 2, 3, 4]
    assert finite(sft, ["ce", "dec_ce", "kl", "stop_ce", "grad_norm"])
    assert all(r["kl"] > 0 and r["sigma"] > 0 for r in sft)
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "atp" and cfg["phase"] == "sft" and cfg["c_thought"] == 2 and cfg["max_latents"] == 6
    assert cfg["stage"] == 4 and cfg["method"] == "atp_sft"
    for f in ("vae_head.safetensors", "stop_head.safetensors", "decoder/model.safetensors", "curves.png"):
        assert (out / f).is_file(), f
    assert not (out.parent / "atp_sft.tmp").exists()
    AutoModelForCausalLM.from_pretrained(out)                              # plain transformers loads the LM ...
    AutoModelForCausalLM.from_pretrained(out / "decoder")                  # ... and the decoder
    assert atp_sft.LATENT in AutoTokenizer.from_pretrained(out).get_vocab()
    model, tok, cfg = common.load_model(str(out), torch.device("cpu"), torch.float32)
    atp_sft.load_extras(model, out, cfg)
    assert cfg["mode"] == "atp" and isinstance(model.atp_heads, atp_sft.ATPHeads)
    assert "atp_heads" not in " ".join(model.state_dict())                # the heads stay out of the LM's weights


@pytest.mark.slow
def test_eval_runs_the_checkpoint_and_shows_latents(sft_run, tmp_path):
    p = run_script("eval.py", "--model", sft_run, "--max_samples", "4", "--num_samples", "2", "--show", "2",
                   "--show_latents", "--max_completion_length", "32", "--output_file", tmp_path / "e.json")
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["mode"] == "atp" and 0 <= res["pass@1"] <= res["pass@2"] <= 1 and res["mean_L"] >= 2
    assert p.stdout.count("latents read as:") == 2 and "| atp |" in p.stdout


def test_sft_high_lr_step_trains_lm_heads_and_decoder(tmp_path):
    out = tmp_path / "sft"
    run_main(atp_sft, *FAST, "--start_stage", "4", "--steps_per_stage", "1", "--learning_rate", "1e-2",
             "--max_eval_samples", "2", "--output_dir", out)
    before = load_file(f"{toy_task.COT}/model.safetensors")
    for sub in ("model.safetensors", "decoder/model.safetensors"):
        after = load_file(out / sub)
        for name, w in before.items():
            new = after[name][: w.shape[0]] if "embed" in name else after[name]
            assert not torch.allclose(new, w), f"{sub}: {name} did not change"
    vae = load_file(out / "vae_head.safetensors")
    assert vae["logvar.bias"].mean().item() != -4.0 and (vae["logvar.weight"] != 0).any()


# ----------------------------------------------------------------------------------------------
# the scale features

def old_atp_forward(model, heads, ids, mask, n_latent, c0):
    """atp_forward as it was: whole (B, L, V) logits from every pass."""
    from transformers import DynamicCache
    pos = common.positions(mask)
    n_max = int(n_latent.max())
    cache = DynamicCache(config=model.config)
    logits, hidden = common.lm_forward(model, ids[:, :c0], mask[:, :c0], pos[:, :c0], cache)
    chunks, zs = [logits], []
    for k in range(n_max):
        a, b = c0 + k, (c0 + k + 1 if k < n_max - 1 else ids.shape[1])
        is_latent = torch.zeros((ids.shape[0], b - a), dtype=torch.bool)
        is_latent[:, 0] = k < n_latent
        mu, logvar = heads.vae(hidden[:, -1])
        z = atp_sft.sample_latent(mu, logvar)
        logits, hidden = common.lm_forward(model, ids[:, a:b], mask[:, :b], pos[:, a:b], cache, latent_mask=is_latent,
                                           latent_vectors=z[:, None].expand(-1, b - a, -1))
        chunks.append(logits)
        zs.append(z)
    return torch.cat(chunks, 1), torch.stack(zs, 1)


def test_log_probs_without_whole_logits_equal_the_old_forward(toy):
    """The new forward's per-position log-probs (the last pass in chunks, each earlier pass its last
    position) equal log-softmax of the old forward's whole logits at every labelled position, rows
    with fewer latents than the batch's most included; the decoder's CE equals F.cross_entropy."""
    model, tok, special = toy
    torch.manual_seed(0)
    heads = atp_sft.ATPHeads(model.config.hidden_size)
    args = SimpleNamespace(c_thought=2, max_latent_stage=3)
    cfg = {"prompt_format": "plain", "system_prompt": ""}
    exs = [atp_sft.build_example(tok, ex, 3, args, special, cfg) for ex in toy_task.dataset("train", 8)]
    ids, mask, labels, n_latent, c0 = atp_sft.collate(exs, tok.pad_token_id, torch.device("cpu"))
    assert len(set(n_latent.tolist())) > 1                                  # some rows stop thinking earlier
    with torch.no_grad():
        torch.manual_seed(1)
        logp, mu, logvar, zs, after = atp_sft.atp_forward(model, heads, ids, mask, n_latent, c0)
        torch.manual_seed(1)
        logits, old_zs = old_atp_forward(model, heads, ids, mask, n_latent, c0)
    whole = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    labelled = labels[:, 1:] != -100
    assert torch.equal(zs, old_zs) and labelled.sum() > 0
    assert torch.allclose(logp[labelled], whole[labelled], atol=1e-5)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
    assert torch.allclose(-(logp * labelled).sum(), ce, rtol=1e-5)
    # the decoder: its loss against whole logits, by hand
    targets = [e.targets for e in exs]
    with torch.no_grad():
        dec_sum, dec_n = atp_sft.decoder_loss(model, zs, n_latent, targets, 2, tok.pad_token_id)
    want, n = 0.0, 0
    for i, tg in enumerate(targets):
        for j, t in enumerate(tg[:int(n_latent[i]) // 2]):
            x = torch.tensor([[tok.pad_token_id] * 2 + t])
            vec = torch.zeros(1, x.shape[1], zs.shape[-1])
            vec[0, :2] = zs[i, 2 * j:2 * j + 2]
            with torch.no_grad():
                lg, _ = common.lm_forward(model, x, torch.ones_like(x), latent_mask=vec.abs().sum(-1) > 0,
                                          latent_vectors=vec)
            want += -lg[0, 1:-1].log_softmax(-1).gather(-1, torch.tensor(t)[:, None]).sum().item()
            n += len(t)
    assert dec_n == n and dec_sum.item() == pytest.approx(want, rel=1e-5)


ONE = ["--start_stage", "4", "--steps_per_stage", "1", "--train_batch_size", "8", "--micro_batch_size", "8",
       "--max_train_samples", "64", "--max_eval_samples", "2", "--max_completion_length", "16"]


def test_gradient_checkpointing_keeps_the_latent_passes_exact(tmp_path):
    """One step at stage 4 (every step latent, rows of 4 and 6 latents) with and without
    --gradient_checkpointing: the same LM, decoder and heads."""
    for name, extra in (("plain", []), ("ckpt", ["--gradient_checkpointing"])):
        run_main(atp_sft, *ONE, "--learning_rate", "1e-2", *extra, "--output_dir", tmp_path / name)
    for f in ("model.safetensors", "decoder/model.safetensors", "vae_head.safetensors", "stop_head.safetensors"):
        a, b = load_file(tmp_path / "plain" / f), load_file(tmp_path / "ckpt" / f)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), f
    before = load_file(f"{toy_task.COT}/model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    after = load_file(tmp_path / "ckpt" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert not torch.allclose(after, before)


def test_lora_trains_adapters_and_the_markers_rows_and_saves_merged_weights(tmp_path, capsys):
    out = tmp_path / "lora"
    model = run_main(atp_sft, *ONE, "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2",
                     "--output_dir", out)
    assert "memory plan per device (GB): weights" in capsys.readouterr().out
    start, _, _ = common.load_model(toy_task.COT, torch.device("cpu"), torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    new = tok.convert_tokens_to_ids([atp_sft.START_LATENT, atp_sft.END_LATENT, atp_sft.LATENT])
    before = start.state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()        # plain transformers: merged weights
    assert not any("lora" in k for k in after)
    emb, emb0 = after["model.embed_tokens.weight"], before["model.embed_tokens.weight"]   # (the toy has the markers)
    others = [i for i in range(emb0.shape[0]) if i not in new]
    assert torch.equal(emb[others], emb0[others])                         # the other rows are frozen ...
    assert all(not torch.allclose(emb[i], emb0[i]) for i in new)          # ... the markers' rows train
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.allclose(after[name], before[name]), name        # adapters merged in
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])   # not a LoRA target: untouched
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or "trainable_tokens" in n for n in trained)
    dec = load_file(out / "decoder/model.safetensors")                    # the decoder trains fully
    assert not torch.allclose(dec["model.norm.weight"], before["model.norm.weight"])


def test_a_stopped_run_resumes_exactly_between_and_within_stages(tmp_path, interrupted_after):
    """Stages 3 and 4, two steps each. Straight, and killed after step 2 (the end of stage 3, after
    its evaluation) then resumed: the same LM, decoder, heads and metrics, each step once; resumed
    from checkpoint-3 (within stage 4: its AdamW state and data order): the same weights."""
    two = ["--start_stage", "3", "--steps_per_stage", "2", "--train_batch_size", "4", "--micro_batch_size", "4",
           "--max_train_samples", "32", "--max_eval_samples", "2", "--max_completion_length", "16", "--log_every", "1",
           "--learning_rate", "1e-2"]
    run_main(atp_sft, *two, "--output_dir", tmp_path / "straight")
    with interrupted_after(3):
        run_main(atp_sft, *two, "--save_steps", "1", "--save_total_limit", "2", "--output_dir", tmp_path / "run")
    assert sorted(common.checkpoints(tmp_path / "run")) == [2, 3]
    run_main(atp_sft, *two, "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-3"),
             "--output_dir", tmp_path / "mid")
    run_main(atp_sft, *two, "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-2"),
             "--output_dir", tmp_path / "run")
    files = ("model.safetensors", "decoder/model.safetensors", "vae_head.safetensors", "stop_head.safetensors")
    for run in ("run", "mid"):
        for f in files:
            a, b = load_file(tmp_path / "straight" / f), load_file(tmp_path / run / f)
            assert all(torch.equal(a[k], b[k]) for k in a), (run, f)
    rows = [{k: v for k, v in r.items() if k not in ("step_s", "tok_per_s", "peak_mem_gb")}
            for r in common.read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert rows == [{k: v for k, v in r.items() if k not in ("step_s", "tok_per_s", "peak_mem_gb")}
                    for r in common.read_metrics(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "ce" in r] == [1, 2, 3, 4]
    assert [r["stage"] for r in rows if "eval_acc" in r] == [3, 4]
    ckpt = tmp_path / "run" / "checkpoint-2"                               # eval.py's way in
    model, _, cfg = common.load_model(str(ckpt), torch.device("cpu"))
    atp_sft.load_extras(model, ckpt, cfg)
    assert cfg["mode"] == "atp" and cfg["stage"] == 3 and (ckpt / "decoder" / "model.safetensors").is_file()


@pytest.mark.parametrize("argv,words", [
    (["--c_thought", "0"], "--c_thought must be at least 1"),
    (["--start_stage", "0"], "--start_stage must be at least 1"),
    (["--start_stage", "3", "--end_stage", "2"], "--end_stage 2 comes before --start_stage 3"),
    (["--model", toy_task.COCONUT], "atp_sft.py does not train 'coconut' checkpoints"),
    (["--lora_r", "-1"], "--lora_r must be >= 0"),
    (["--steps_per_stage", "0"], "--steps_per_stage must be at least 1"),
    (["--dataset", "toy:8", "--train_batch_size", "16"], "--train_batch_size 16 exceeds the training set (8 examples)"),
    (["--distributed", "deepspeed"], ("argument --distributed", "invalid choice: 'deepspeed'")),  # argparse's
    (["--save_dtype", "fp8"], ("argument --save_dtype", "invalid choice: 'fp8'")),
])
def test_bad_input_is_one_line(argv, words, tmp_path):
    message = main_error("atp_sft", *argv, "--output_dir", tmp_path / "x")
    assert all(w in message for w in ((words,) if isinstance(words, str) else words)), message


@pytest.mark.slow
def test_bad_input_from_the_command_line(tmp_path):
    one_line_error(run_script("atp_sft.py", "--c_thought", "0", "--output_dir", tmp_path / "x", ok=False, timeout=120),
                   "--c_thought must be at least 1")


@pytest.mark.slow
def test_show_latents_needs_an_atp_checkpoint(tmp_path):
    p = run_script("eval.py", "--model", toy_task.COCONUT, "--max_samples", "2", "--show_latents",
                   "--output_file", tmp_path / "e.json", ok=False)
    one_line_error(p, "--show_latents needs a checkpoint with a latent decoder")


def test_starts_and_flags_that_do_not_fit(smol_tiny, tmp_path):
    assert "--dataset is required" in main_error("atp_sft", "--model", smol_tiny, "--output_dir", tmp_path / "x")
    with pytest.raises(SystemExit, match="unknown argument --num_generations"):   # RL's flags live in atp_rl.py
        common.parse_args(atp_sft.Args, ["--num_generations", "4"])
    assert all(f.metadata.get("help") for _, _, f in sum(common.flag_fields(atp_sft.Args), []))


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
    commands = docs_commands("atp_sft.py")
    assert len(commands) >= 3
    real = [argv for argv in commands if "--dataset" in argv]
    assert len(real) >= 2 and all("--chat_template" in argv for argv in real)
    for argv in commands:
        common.parse_args(atp_sft.Args, argv)                              # every flag exists


@pytest.mark.slow
def test_two_process_atp_sft(tmp_path):
    """torchrun, 2 CPU processes, the SFT under FSDP2: the ranks end with identical weights."""
    out = tmp_path / "atp_sft"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29525",
               ROOT / "tests" / "dist_worker.py", "atp_sft", *FAST, "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "ce" in r]
    assert rows and all(r["ce"] == r["ce"] for r in rows)


def test_answers_end_the_turn_with_the_chat_template(smol_tiny):
    """ATP-Latent's SFT answers end with <|im_end|> under the chat template (moved from test_real_coconut.py)."""
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    special = common.add_special_tokens(model, tok, [atp_sft.START_LATENT, atp_sft.END_LATENT, atp_sft.LATENT],
                                        init_from="<<")
    stop, im_end = common.stop_ids(model, tok), tok.convert_tokens_to_ids("<|im_end|>")
    chat = {"prompt_format": "chat", "system_prompt": "Be brief."}
    ex = {"question": "Q?", "steps": ["<<2*3=6>>"], "answer": "6"}
    args = dataclasses.replace(atp_sft.Args(), max_latent_stage=3, c_thought=2)
    example = atp_sft.build_example(tok, ex, 1, args, special, chat, common.answer_end_id(tok, chat, stop))
    assert example.labels[-1] == im_end and example.tail[-1] == im_end
