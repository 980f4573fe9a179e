#!/bin/bash
# Lane I (1 thread): the no-SubGRPO, no-BP and DMD2-objective-stage-1 ablations continued from 50 to 120 epochs
# (RTDMD's and no-DM's length), each then evaluated.
cd /work/main && . .venv/bin/activate
E="--experiment shapes-study --threads 1 --workers 1 --quiet"
T="--set train.num_threads=1 --set tracking.experiment=shapes-study --quiet --set train.max_steps=120"
echo "I start $(date +%T)"
for ab in no-subgrpo no-bp dmd2-stage1; do
  init=runs/study/rtdmd/stage1; [ $ab = dmd2-stage1 ] && init=runs/study/acdmd-dmd2obj
  rtdmd-bench train rtdmd --stage 2 --init $init --preset $ab --out runs/study/rtdmd-$ab --resume $T
  rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd-$ab --steps 4 --out runs/study/eval $E
  echo "I $ab done $(date +%T)"
done
echo "I DONE $(date +%T)"
