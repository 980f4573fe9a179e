# Re-score every shapes-study and teacher-steps evaluation with the current shipped reward bundle (shapes_pref,
# shapes_aes, FD-shapes): the images on disk are reused, nothing is regenerated; the runs keep their MLflow ids.
# The step-50 checkpoints of rtdmd-dmd2-stage1, rtdmd-no-subgrpo and rtdmd-no-bp were rotated away when those runs
# continued to 120 epochs: their first-bundle preference / aesthetic / fid runs were soft-deleted in MLflow
# (restorable with `mlflow runs restore`); their GenEval-shapes runs stay.
set -e
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/rtdmd-no-bp/checkpoints/step_000120 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/rtdmd-dmd2-stage1/checkpoints/step_000120 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/rtdmd-no-subgrpo/checkpoints/step_000120 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/dmd2-44/checkpoints/step_000566 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/dmd2-shapes/checkpoints/step_000500 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/dmd2-shapes/checkpoints/step_000288 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint rtdmd/assets/shapes_teacher --steps 28 --guidance 4 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/rtdmd-epoch50 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/rtdmd/stage2/checkpoints/step_000120 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/rtdmd/stage1/checkpoints/step_000600 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/hypersd-shapes/checkpoints/step_000550 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/rtdmd-no-dm/checkpoints/step_000120 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/acdmd-dmd2obj/checkpoints/step_000600 --steps 4 --guidance 1 --out runs/study/eval --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint runs/study/lcm-shapes/checkpoints/step_001268 --steps 4 --guidance 1 --out runs/study/eval-lcm --experiment shapes-study --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint rtdmd/assets/shapes_teacher --steps 28 --guidance 4 --out runs/eval --experiment teacher-steps --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint rtdmd/assets/shapes_teacher --steps 28 --guidance 1 --out runs/eval --experiment teacher-steps --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint rtdmd/assets/shapes_teacher --steps 8 --guidance 4 --out runs/eval --experiment teacher-steps --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint rtdmd/assets/shapes_teacher --steps 8 --guidance 1 --out runs/eval --experiment teacher-steps --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint rtdmd/assets/shapes_teacher --steps 4 --guidance 4 --out runs/eval --experiment teacher-steps --threads 1 --workers 1 --quiet
rtdmd-bench eval --suite preference,aesthetic,fid --checkpoint rtdmd/assets/shapes_teacher --steps 4 --guidance 1 --out runs/eval --experiment teacher-steps --threads 1 --workers 1 --quiet
rtdmd-bench report --experiment shapes-study --out reports/shapes-study/report.md
rtdmd-bench report --experiment teacher-steps --out reports/teacher-steps/report.md
