#!/bin/bash
# Lane C (1 thread): Hyper-SD with its shapes config, capped at 40 minutes (third job on 2 cores), then its eval.
cd /work/main && . .venv/bin/activate
echo "C start $(date +%T)"
rtdmd-bench train hypersd --out runs/study/hypersd-shapes --resume-if-exists --set train.num_threads=1 --set train.max_minutes=40 --set "method.segment_steps=[100,100,100,100]" --set method.refl_steps=50 --set train.max_steps=550 --set tracking.experiment=shapes-study --quiet
echo "C trained $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/hypersd-shapes --steps 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
echo "C DONE $(date +%T)"
