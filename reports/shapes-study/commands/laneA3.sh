#!/bin/bash
# Lane A, continued (1 thread): once the RTDMD run ends, the AC-DMD (stage 1), RTDMD and RTDMD@50 evals.
cd /work/main && . .venv/bin/activate
E="--experiment shapes-study --threads 1 --workers 1 --quiet"
while kill -0 16594 2>/dev/null; do sleep 15; done
echo "A rtdmd trained $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd/stage1 --steps 4 --out runs/study/eval $E
echo "A acdmd evaluated $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd --steps 4 --out runs/study/eval $E
echo "A rtdmd evaluated $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd-epoch50 --steps 4 --out runs/study/eval $E
echo "A DONE $(date +%T)"
