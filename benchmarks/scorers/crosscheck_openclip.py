"""Cross-check the HPSv2.1 key mapping (openclip_to_hf) against open_clip itself.

Needs open_clip importable (it needs a working torchvision, e.g. with a CUDA torch), so it
is a script, not a test. Random weights of the real architecture (default ViT-H-14, the
HPSv2.1 model), perturbed so no LayerNorm is the identity; prints the largest differences of
the normalised image / text embeddings and of the cosine scores.

    python -m benchmarks.scorers.crosscheck_openclip [ARCH] [DEVICE]

open_clip and transformers are imported when the check runs (optional and heavy).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.scorers.clip_family import openclip_to_hf


def main(arch: str = "ViT-H-14", device: str = "cuda") -> float:
    import open_clip
    from transformers import CLIPModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    ref = open_clip.create_model(arch, pretrained=None).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = open_clip.get_model_config(arch)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    heads = dict(vision_heads=v["width"] // v.get("head_width", 64), text_heads=t.get("heads", 8))
    sd = {k: x.detach().clone() for k, x in ref.state_dict().items()}
    config, hf_sd = openclip_to_hf(sd, **heads)
    hf = CLIPModel(config)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)
    ref, hf = ref.to(device), hf.eval().to(device)
    size = v["image_size"]
    x = torch.randn(4, 3, size, size, device=device)
    prompts = ["a photo of a dog", "an orange cat left of a red car", "two teddy bears", "a blue toothbrush"]
    tokens = open_clip.get_tokenizer(arch)(prompts).to(device)
    with torch.no_grad():
        ia = ref.encode_image(x, normalize=True)
        ta = ref.encode_text(tokens, normalize=True)
        ib = F.normalize(hf.visual_projection(hf.vision_model(pixel_values=x).pooler_output), dim=-1)
        tb = F.normalize(hf.text_projection(hf.text_model(input_ids=tokens).pooler_output), dim=-1)
    d_img, d_txt = (ia - ib).abs().max().item(), (ta - tb).abs().max().item()
    d_cos = ((ia * ta).sum(-1) - (ib * tb).sum(-1)).abs().max().item()
    print(f"{arch} on {device}: max |d image emb| {d_img:.2e}, |d text emb| {d_txt:.2e}, |d cosine| {d_cos:.2e}")
    print("open_clip cos:", [round(c, 5) for c in (ia * ta).sum(-1).tolist()])
    print("ours      cos:", [round(c, 5) for c in (ib * tb).sum(-1).tolist()])
    return d_cos


if __name__ == "__main__":
    main(*sys.argv[1:])
