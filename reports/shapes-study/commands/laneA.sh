#!/bin/bash
# Lane A (1 thread): RTDMD (AC-DMD stage 1 600 steps, stage 2 120 epochs), its evals, then ablations.
cd /work/main && . .venv/bin/activate
E="--experiment shapes-study --threads 1 --workers 1 --quiet"
T="--set train.num_threads=1 --set tracking.experiment=shapes-study --quiet"
echo "A start $(date +%T)"
rtdmd-bench train rtdmd --out runs/study/rtdmd --resume-if-exists $T --set method.stage1_train.max_steps=600 --set train.max_steps=120
echo "A rtdmd trained $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd/stage1 --steps 4 --out runs/study/eval $E
echo "A acdmd evaluated $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd --steps 4 --out runs/study/eval $E
echo "A rtdmd evaluated $(date +%T)"
for ab in no-subgrpo no-bp; do
  rtdmd-bench train rtdmd --stage 2 --init runs/study/rtdmd/stage1 --preset $ab --out runs/study/rtdmd-$ab --resume-if-exists $T --set train.max_steps=120
  rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd-$ab --steps 4 --out runs/study/eval $E
  echo "A $ab done $(date +%T)"
done
echo "A DONE $(date +%T)"
