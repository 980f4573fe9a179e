#!/bin/bash
# Lane F (1 thread): the DMD2 baseline resumed to its default budget (train.max_minutes=44), then its eval.
cd /work/main && . .venv/bin/activate
echo "F start $(date +%T)"
rtdmd-bench train dmd2 --out runs/study/dmd2-shapes --resume-if-exists --set train.num_threads=1 --set tracking.experiment=shapes-study --quiet
echo "F trained $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/dmd2-shapes --steps 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
echo "F DONE $(date +%T)"
