#!/bin/bash
# Lane F, continued: the DMD2 baseline's step-500 checkpoint (47.4 min; the resumed run was stopped there by hand,
# since train.max_minutes then counted minutes of one process, not of the run), then its eval.
cd /work/main && . .venv/bin/activate
echo "F2 start $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/dmd2-shapes/checkpoints/step_000500 --steps 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
echo "F2 DONE $(date +%T)"
