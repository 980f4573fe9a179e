#!/bin/bash
# Ablation $1 (no-subgrpo | no-bp): stage 2 for 50 epochs from the study's stage 1 (1 thread), then its eval.
cd /work/main && . .venv/bin/activate
ab=$1
echo "E $ab start $(date +%T)"
rtdmd-bench train rtdmd --stage 2 --init runs/study/rtdmd/stage1 --preset $ab --out runs/study/rtdmd-$ab --resume-if-exists --set train.num_threads=1 --set tracking.experiment=shapes-study --quiet --set train.max_steps=50
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd-$ab --steps 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
echo "E $ab DONE $(date +%T)"
