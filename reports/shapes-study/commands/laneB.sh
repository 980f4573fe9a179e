#!/bin/bash
# Lane B (1 thread): the DMD2 objective at AC-DMD's budget (600 fake-score updates), the no-DM ablation
# once lane A's stage 1 exists, the teacher (28 steps, CFG 4) and LCM's remaining suites.
cd /work/main && . .venv/bin/activate
E="--experiment shapes-study --threads 1 --workers 1 --quiet"
T="--set train.num_threads=1 --set tracking.experiment=shapes-study --quiet"
echo "B start $(date +%T)"
rtdmd-bench train ac-dmd --preset dmd2-objective --out runs/study/acdmd-dmd2obj --resume-if-exists $T --set train.max_steps=600
rtdmd-bench eval --suite all --checkpoint runs/study/acdmd-dmd2obj --steps 4 --out runs/study/eval $E
echo "B dmd2-objective done $(date +%T)"
while [ ! -d runs/study/rtdmd/stage2 ]; do sleep 20; done
rtdmd-bench train rtdmd --stage 2 --init runs/study/rtdmd/stage1 --preset no-dm --out runs/study/rtdmd-no-dm --resume-if-exists $T --set train.max_steps=120
rtdmd-bench eval --suite all --checkpoint runs/study/rtdmd-no-dm --steps 4 --out runs/study/eval $E
echo "B no-dm done $(date +%T)"
rtdmd-bench eval --suite all --checkpoint rtdmd/assets/shapes_teacher --steps 28 --guidance 4 --out runs/study/eval $E
echo "B teacher done $(date +%T)"
rtdmd-bench eval --suite all --checkpoint runs/study/lcm-shapes --out runs/study/eval-lcm $E
echo "B DONE $(date +%T)"
