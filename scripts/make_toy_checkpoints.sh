#!/usr/bin/env bash
# Remake the small toy checkpoints committed under checkpoints/ (the no-argument defaults of the
# RL files). About 10 CPU minutes for the CoT model, then the Coconut curriculum (~15 min) and
# Latent-SFT (~20 min) on top of it.
set -euo pipefail
cd "$(dirname "$0")/.."
python coconut_sft.py --model toy --dataset toy:20000 --start_stage 0 --end_stage 0 --epochs_per_stage 2 \
    --learning_rate 3e-3 --lr_scheduler_type cosine --warmup_steps 30 --output_dir checkpoints/toy-cot "$@"
python coconut_sft.py --model checkpoints/toy-cot --dataset toy --output_dir checkpoints/toy-coconut "$@"
python latent_sft.py --model checkpoints/toy-cot --dataset toy --output_dir checkpoints/toy-latent-sft "$@"
