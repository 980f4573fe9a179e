#!/bin/bash
# Lane D (1 thread): the DMD2 baseline with its shapes config, capped at 25 minutes (session time), then its eval.
cd /work/main && . .venv/bin/activate
echo "D start $(date +%T)"
rtdmd-bench train dmd2 --out runs/study/dmd2-shapes --resume-if-exists --set train.num_threads=1 --set train.max_minutes=25 --set tracking.experiment=shapes-study --quiet
echo "D trained $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/dmd2-shapes --steps 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
echo "D DONE $(date +%T)"
