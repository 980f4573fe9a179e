"""Mask2Former + CLIP colour detector: post-processing by hand, plumbing on tiny random models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.geneval.detection import Detection, Detector
from benchmarks.geneval.mask2former import (
    BACKGROUND,
    COLOR_TEMPLATES,
    Mask2FormerDetector,
    composite_crop,
    instance_postprocess,
    mask_to_box,
)
from benchmarks.geneval.prompts import COCO_CLASSES, GENEVAL_COLORS
from rtdmd.errors import UserError
from test_scorers import tiny_clip_dir

# the COCO names as the detection libraries (mmdet, detectron2, transformers configs) spell them
LIBRARY_NAMES = list(COCO_CLASSES)
LIBRARY_NAMES[64:67] = ["mouse", "remote", "keyboard"]


def test_instance_postprocess_by_hand():
    cls = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.1, 0.7]]))
    masks = torch.tensor([[[2.0, -1.0], [0.5, -3.0]], [[-1.0, 1.0], [-2.0, -2.0]]])
    scores, labels, binary = instance_postprocess(cls, masks, max_per_image=3)
    s2, s05, s1 = (1 / (1 + math.exp(-v)) for v in (2.0, 0.5, 1.0))
    q0 = (s2 + s05) / 2  # mean sigmoid inside query 0's mask {(0,0), (1,0)}
    torch.testing.assert_close(scores, torch.tensor([0.6 * q0, 0.3 * q0, 0.2 * s1]), atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [0, 1, 0]
    assert binary[0].tolist() == [[True, False], [True, False]] and binary[2].tolist() == [[False, True], [False, False]]


def test_mask_to_box_is_tight_and_exclusive():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:7] = True
    m[4, 9] = True
    assert mask_to_box(m) == (3.0, 2.0, 10.0, 5.0)
    assert mask_to_box(np.zeros((4, 4), bool)) == (0.0, 0.0, 0.0, 0.0)


def test_composite_crop_greys_out_the_background():
    img = np.zeros((8, 10, 3), np.uint8)
    img[...] = (0, 0, 255)
    mask = np.zeros((8, 10), bool)
    mask[2:6, 3:5] = True
    mask[2, 6] = True
    img[mask] = (255, 0, 0)
    crop = np.asarray(composite_crop(img, Detection("x", 1.0, mask_to_box(mask), mask)))
    assert crop.shape == (4, 4, 3)
    assert (crop[0, 3] == (255, 0, 0)).all() and (crop[1, 3] == BACKGROUND).all()
    assert (crop[mask[2:6, 3:7]] == (255, 0, 0)).all() and (crop[~mask[2:6, 3:7]] == BACKGROUND).all()


def _tiny_mask2former(root, names):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil, SwinConfig

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_feedforward_dim=64, dim_feedforward=64, decoder_layers=3, encoder_layers=1,
                            num_queries=10, num_labels=len(names), num_attention_heads=2,
                            id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(root)
    Mask2FormerImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    root = tmp_path_factory.mktemp("m2f")
    m2f = _tiny_mask2former(root / "m2f", LIBRARY_NAMES)
    clip = tiny_clip_dir(root / "clip")
    return Mask2FormerDetector(path=str(m2f), clip_path=str(clip), max_per_image=25)


def _image(h=50, w=70, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_detect_structure_boxes_and_labels(detector):
    assert isinstance(detector, Detector) and "mask2former" in detector.name and "clip" in detector.name
    assert detector.renamed == {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
    img = _image()
    dets = detector.detect(img)
    assert len(dets) == 25  # top-k over (query, class) pairs, k = max_per_image
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
    for d in dets:
        assert d.label in COCO_CLASSES and 0 <= d.score <= 1
        assert d.mask.shape == img.shape[:2] and d.mask.dtype == bool
        assert d.box == mask_to_box(d.mask)


def test_detect_matches_postprocess_of_raw_outputs(detector):
    img = _image(64, 96, seed=1)  # already the processor's size: no resampling of the masks
    inputs = detector.processor(images=[img], return_tensors="pt")
    with torch.no_grad():
        out = detector.model(**inputs)
    logits = F.interpolate(out.masks_queries_logits, size=(64, 96), mode="bilinear", align_corners=False)[0]
    scores, labels, masks = instance_postprocess(out.class_queries_logits[0], logits, 25)
    dets = detector.detect(img)
    order = scores.argsort(descending=True)
    np.testing.assert_allclose([d.score for d in dets], scores[order].numpy(), rtol=1e-5, atol=1e-7)
    assert [d.label for d in dets] == [COCO_CLASSES[i] for i in labels[order].tolist()]


def test_detector_rejects_non_coco_models(tmp_path):
    m2f = _tiny_mask2former(tmp_path / "m2f", [f"c{i}" for i in range(5)])
    with pytest.raises(UserError, match="80"):
        Mask2FormerDetector(path=str(m2f), clip_path=str(tiny_clip_dir(tmp_path / "clip")))
    with pytest.raises(UserError, match="nowhere"):
        Mask2FormerDetector(path=str(tmp_path / "nowhere" / "m2f"))


def test_colour_classifier_plumbing(detector):
    img = _image()
    mask = np.zeros(img.shape[:2], bool)
    mask[10:30, 20:50] = True
    dets = [Detection("dog", 0.9, mask_to_box(mask), mask), Detection("dog", 0.8, (0.0, 0.0, 70.0, 50.0), None)]
    colours = detector.classify_colors(img, dets, "dog")
    assert len(colours) == 2 and all(c in GENEVAL_COLORS for c in colours)
    assert detector.classify_colors(img, [], "dog") == []
    # by hand: normalised mean over the three templates of normalised text embeddings
    clf = detector._classifier("dog")
    per = [detector.clip.text_embeds([t.format(c=c, cls="dog") for c in GENEVAL_COLORS]) for t in COLOR_TEMPLATES]
    torch.testing.assert_close(clf, F.normalize(sum(per) / 3, dim=-1))
    crop = torch.from_numpy(np.asarray(composite_crop(img, dets[0]))).permute(2, 0, 1)[None].float() / 255
    expected = GENEVAL_COLORS[int((detector.clip.image_embeds(crop) @ clf.T).argmax())]
    assert colours[0] == expected
    # pixels outside the mask do not matter (they are replaced by the grey background)
    other = img.copy()
    other[~mask] = 255 - other[~mask]
    assert detector.classify_colors(other, dets[:1], "dog") == colours[:1]
