#!/bin/bash
# Lane G (1 thread): ablation "plain DMD2 objective in stage 1": stage 2 (50 epochs, as the other ablations)
# from the DMD2-objective stage 1 at 600 steps, then its eval.
cd /work/main && . .venv/bin/activate
echo "G start $(date +%T)"
rtdmd-bench train rtdmd --stage 2 --init runs/study/acdmd-dmd2obj --preset dmd2-stage1 --out runs/study/rtdmd-dmd2-stage1 --resume-if-exists --set train.num_threads=1 --set tracking.experiment=shapes-study --quiet --set train.max_steps=50
echo "G trained $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd-dmd2-stage1 --steps 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
echo "G DONE $(date +%T)"
