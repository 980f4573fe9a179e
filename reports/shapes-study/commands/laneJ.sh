#!/bin/bash
# Lane J (1 thread): the DMD2-objective-stage-1 ablation continued from 50 to 120 epochs beside lane I, then its eval.
cd /work/main && . .venv/bin/activate
echo "J start $(date +%T)"
rtdmd-bench train rtdmd --stage 2 --init runs/study/acdmd-dmd2obj --preset dmd2-stage1 --out runs/study/rtdmd-dmd2-stage1 --resume --set train.num_threads=1 --set tracking.experiment=shapes-study --quiet --set train.max_steps=120
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd-dmd2-stage1 --steps 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
echo "J DONE $(date +%T)"
