"""GenEval's detector on transformers: Mask2Former (COCO instance) + CLIP ViT-L/14 colour classifier.

Detection follows the official mmdet Mask2Former instance post-processing: top-k (k = 100)
over all (query, class) softmax probabilities without the no-object column, masks = mask
logits > 0 at the original image size, score = class prob x mean sigmoid mask prob inside
the mask, box = tight box of the mask (mmdet mask2bbox: x1 = last column + 1). Labels map by
COCO index onto GenEval's names (benchmarks.geneval.prompts.COCO_CLASSES).

Colours follow GenEval's evaluate_images.py: the object composited with its mask on a #999999
background, cropped to its box (PIL crop), classified zero-shot by CLIP ViT-L/14 over the 10
colours, class embedding = normalised mean of the normalised embeddings of three templates.
transformers' model classes are imported when the detector loads (heavy).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from benchmarks.geneval.detection import Detection
from benchmarks.geneval.prompts import COCO_CLASSES, GENEVAL_COLORS
from benchmarks.scorers.clip_family import CLIPScore
from benchmarks.scorers.common import identity_of, resolve_dir
from rtdmd.errors import UserError

MASK2FORMER_ID = "facebook/mask2former-swin-small-coco-instance"
CLIP_ID = "openai/clip-vit-large-patch14"
#: mmdet Mask2Former test_cfg.max_per_image
MAX_PER_IMAGE = 100
#: GenEval's default crop background, "#999"
BACKGROUND = (153, 153, 153)
COLOR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")


def instance_postprocess(class_logits: torch.Tensor, mask_logits: torch.Tensor, max_per_image: int = MAX_PER_IMAGE):
    """(Q, C+1) class logits, (Q, H, W) mask logits -> (scores (k,), labels (k,), masks (k, H, W) bool)."""
    q, c1 = class_logits.shape
    num_classes = c1 - 1
    probs = class_logits.float().softmax(-1)[:, :-1]
    k = min(max_per_image, q * num_classes)
    top, idx = probs.flatten().topk(k)
    labels = idx % num_classes
    query = torch.div(idx, num_classes, rounding_mode="floor")
    logits = mask_logits[query].float()
    masks = logits > 0
    mask_score = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return top * mask_score, labels, masks


def mask_to_box(mask: np.ndarray | torch.Tensor) -> tuple[float, float, float, float]:
    """Tight box of a boolean (H, W) mask as (x0, y0, x1, y1), x1/y1 exclusive; empty -> zeros."""
    m = torch.as_tensor(mask, dtype=torch.bool)
    cols = torch.nonzero(m.any(0)).flatten()
    rows = torch.nonzero(m.any(1)).flatten()
    if len(cols) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def composite_crop(image: np.ndarray, det: Detection, background=BACKGROUND) -> Image.Image:
    """The object on a flat background (where its mask is False), cropped to its box."""
    img = Image.fromarray(image).convert("RGB")
    if det.mask is not None:
        if det.mask.shape != image.shape[:2]:
            raise ValueError(f"mask {det.mask.shape} does not match image {image.shape[:2]}")
        img = Image.composite(img, Image.new("RGB", img.size, background), Image.fromarray(det.mask.astype(bool)))
    x0, y0, x1, y1 = det.box
    if round(x1) <= round(x0) or round(y1) <= round(y0):
        return img  # empty box (empty mask): nothing to crop to
    return img.crop((x0, y0, x1, y1))


class Mask2FormerDetector:
    """Implements benchmarks.geneval.detection.Detector with transformers models."""

    def __init__(
        self,
        path: str | None = None,
        clip_path: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_per_image: int = MAX_PER_IMAGE,
        clip_batch_size: int = 16,
    ):
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessorPil

        folder = resolve_dir(path or MASK2FORMER_ID, "Mask2Former (COCO instance)", ["config.json", "preprocessor_config.json"])
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder), local_files_only=True)
            # the PIL processor: same preprocessing with or without torchvision installed
            self.processor = Mask2FormerImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:
            raise UserError(f"could not load Mask2Former from {folder} ({type(exc).__name__}: {exc}); pass a complete model directory.") from None
        if self.model.config.num_labels != len(COCO_CLASSES):
            raise UserError(f"{folder} predicts {self.model.config.num_labels} classes, not COCO's 80; pass a COCO instance model.")
        self.device = torch.device(device)
        self.dtype = dtype
        self.model.eval().requires_grad_(False).to(self.device, dtype)
        self.max_per_image = max_per_image
        # COCO index -> GenEval name; record where the model's own names differ
        id2label = self.model.config.id2label
        self.renamed = {id2label[i]: COCO_CLASSES[i] for i in range(len(COCO_CLASSES)) if id2label.get(i) != COCO_CLASSES[i]}
        self.clip = CLIPScore(clip_path or CLIP_ID, device=device, dtype=dtype, batch_size=clip_batch_size)
        self.name = f"mask2former[{identity_of(folder)}]+clip[{self.clip.identity}]"
        self._classifiers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> list[Detection]:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise UserError(f"detector input must be an (H, W, 3) uint8 image; got {image.shape} {image.dtype}.")
        h, w = image.shape[:2]
        inputs = self.processor(images=[image], return_tensors="pt")
        px = inputs["pixel_values"].to(self.device, self.dtype)
        pm = inputs["pixel_mask"].to(self.device)
        out = self.model(pixel_values=px, pixel_mask=pm)
        # mask logits (1/4 res of the padded input) -> padded input -> valid region -> original size
        logits = F.interpolate(out.masks_queries_logits.float(), size=px.shape[-2:], mode="bilinear", align_corners=False)
        valid_h, valid_w = int(pm[0].any(1).sum()), int(pm[0].any(0).sum())
        logits = F.interpolate(logits[:, :, :valid_h, :valid_w], size=(h, w), mode="bilinear", align_corners=False)
        scores, labels, masks = instance_postprocess(out.class_queries_logits[0], logits[0], self.max_per_image)
        dets = []
        for s, lab, m in zip(scores.tolist(), labels.tolist(), masks.cpu().numpy()):
            dets.append(Detection(label=COCO_CLASSES[lab], score=float(s), box=mask_to_box(m), mask=m))
        dets.sort(key=lambda d: -d.score)
        return dets

    def _classifier(self, class_name: str) -> torch.Tensor:
        if class_name not in self._classifiers:
            per_template = [
                self.clip.text_embeds([t.format(c=c, cls=class_name) for c in GENEVAL_COLORS]) for t in COLOR_TEMPLATES
            ]
            # clip_benchmark zero_shot_classifier: mean of normalised template embeddings, renormalised
            self._classifiers[class_name] = F.normalize(torch.stack(per_template).mean(0), dim=-1)
        return self._classifiers[class_name]

    @torch.no_grad()
    def classify_colors(self, image: np.ndarray, detections: list[Detection], class_name: str) -> list[str]:
        if not detections:
            return []
        crops = [composite_crop(image, d) for d in detections]
        px = torch.cat(
            [self.clip._pixels(torch.from_numpy(np.array(c)).permute(2, 0, 1)[None].float() / 255) for c in crops]
        )
        emb = torch.cat([self.clip.embed_pixels(px[i : i + self.clip.batch_size]) for i in range(0, len(px), self.clip.batch_size)])
        pred = (emb @ self._classifier(class_name).T).argmax(-1)
        return [GENEVAL_COLORS[i] for i in pred.tolist()]
