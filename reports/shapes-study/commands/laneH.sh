#!/bin/bash
# Lane H (1 thread): the DMD2 baseline at its default budget (44 minutes of training, now counted across resumes):
# the 25-minute run's step-288 checkpoint copied to dmd2-44 and resumed with the shipped config, then its eval.
cd /work/main && . .venv/bin/activate
echo "H start $(date +%T)"
rtdmd-bench train dmd2 --out runs/study/dmd2-44 --resume --set train.num_threads=1 --set tracking.experiment=shapes-study --set tracking.run_name=train-dmd2-shapes-44min --quiet
echo "H trained $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/dmd2-44 --steps 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
echo "H DONE $(date +%T)"
