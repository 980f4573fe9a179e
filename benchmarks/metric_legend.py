"""What each evaluation metric measures and its range: the legend of a report (benchmarks.report) and of a
study report (benchmarks.study.report).

Sources: docs/shapes-rewards.md (oracle, learned shapes rewards, FD-shapes), docs/scorers.md (the real
scorers' scales), docs/evaluation.md (suites and metric names).
"""

from __future__ import annotations

METRIC_LEGEND = {
    "geneval/overall": "GenEval score: the mean of the task accuracies below; 0 to 1, higher is better",
    "geneval/task": "fraction of the task's images that the detector and GenEval's rules judge correct; 0 to 1",
    "geneval": "GenEval score of a study (per image: 1 if the detector and GenEval's rules judge it correct, else 0); "
               "an arm's score is the mean of its task accuracies, as geneval/overall; 0 to 1",
    "reward/oracle": "the shapes world's preference oracle (its 'human taste', never trained on): 0.6 x faithfulness "
                     "(GenEval partial credit) + 0.4 x image quality (background, edges, frame, overlap, size); 0 to 1",
    "reward/shapes_pref": "learned shapes preference model (the HPS / PickScore analogue), trained on pairs the oracle "
                          "labelled and calibrated to the oracle's units (about 0 to 1, not bounded); well above "
                          "reward/oracle means the generator exploits the learned model",
    "reward/shapes_aes": "learned shapes aesthetic model (the LAION-aesthetic analogue, no prompt), trained on pairs "
                         "labelled by the oracle's quality part and calibrated to it (about 0 to 1, not bounded)",
    "fd_shapes": "FD-shapes (the FID analogue): Frechet distance between the shapes encoder's 64-d features of the "
                 "images and of true renders of the same prompts; 0 or more, lower is better",
    "fid": "FID (clean-fid, Inception features) against --fid-reference; 0 or more, lower is better",
    "reward/hpsv21": "HPSv2.1 human preference score (image-text cosine); about 0.25 to 0.35",
    "reward/imagereward": "ImageReward human preference reward (z-scored); about -2 to 2",
    "reward/pickscore": "PickScore human preference score (scaled image-text cosine); about 18 to 24",
    "reward/clipscore": "CLIPScore, raw image-text cosine of CLIP ViT-L/14; about 0.28 to 0.33",
    "reward/aesthetic": "LAION aesthetic predictor v2; 1 to 10",
    "toy2d/in_mode": "toy2d: fraction of samples within 3 standard deviations of a mode of the prompt's target "
                     "(the mixture for the empty prompt, the named mode otherwise); 0 to 1",
    "toy2d/log_density": "toy2d: log density of a sample under the prompt's true target distribution; "
                         "unbounded (a log density: above 0 near a narrow mode), higher is better",
}


def legend(metrics: list[str]) -> list[str]:
    """One line per metric shown: what it measures and its range (higher is better unless said)."""
    lines = ["## What the metrics measure", "",
             "Higher is better except where a line says lower; every score is a mean over images."]
    tasks = [m for m in metrics if m.startswith("geneval/") and m != "geneval/overall"]
    for m in metrics:
        if m in tasks and m != tasks[0]:
            continue
        shown = f"`{m}`" if m not in tasks else "`geneval/<task>`"
        text = METRIC_LEGEND.get("geneval/task" if m in tasks else m, "no description recorded for this metric")
        lines.append(f"- {shown}: {text}.")
    return lines + [""]
