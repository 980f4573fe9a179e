"""Published architecture configs of the real backends' networks (no weights).

Numbers are the ``config.json`` values of the published diffusers / transformers checkpoints,
written down here so full-size networks can be instantiated randomly (GPU benchmark) or on the
meta device (memory table) without downloading anything. Parameter counts computed from these
configs are checked against the published sizes in tests/test_perf_real_backends.py.
"""

from __future__ import annotations

# ---- SD3 family: SD3Transformer2DModel (transformer/config.json)
SD3_TRANSFORMERS = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 2B MMDiT, 24 joint blocks of width 24 x 64 = 1536
    "sd3-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X, self-attention branch in blocks 0-12, QK RMS-norm
    "sd3.5-medium": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    # stabilityai/stable-diffusion-3.5-large: 38 blocks of width 38 x 64 = 2432, QK RMS-norm
    "sd3.5-large": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                        attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                        caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
}
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
               use_quant_conv=False, use_post_quant_conv=False)
# text encoders: CLIP-L/14, OpenCLIP bigG/14 (CLIPTextModelWithProjection), T5 v1.1 XXL encoder
SD3_TEXT = {
    "clip_l": dict(kind="clip", hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu"),
    "clip_g": dict(kind="clip", hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, vocab_size=49408, max_position_embeddings=77, hidden_act="gelu"),
    "t5_xxl": dict(kind="t5", d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
                   feed_forward_proj="gated-gelu"),
}
SD3_TOKENS = 77 + 256  # CLIP tokens + T5 tokens (max_sequence_length 256)

# ---- FLUX.2 klein: Flux2Transformer2DModel (transformer/config.json), same for base and distilled
FLUX2_TRANSFORMERS = {
    "klein-base-4b": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                          num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                          mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
    "klein-base-9b": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
                          num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256,
                          mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
}
FLUX2_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=32, norm_num_groups=32)
# text encoders: Qwen3-4B (klein 4B) and Qwen3-8B (klein 9B); joint_attention_dim = 3 x hidden_size
FLUX2_TEXT = {
    "klein-base-4b": dict(kind="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          tie_word_embeddings=True),
    "klein-base-9b": dict(kind="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                          tie_word_embeddings=False),
}
FLUX2_TOKENS = 512  # Qwen3 tokens (max_sequence_length 512)

# ---- differentiable rewards' image towers: CLIP ViT-H/14 (HPSv2.1 and PickScore both use it) and
# CLIP ViT-L/14 (CLIPScore; the aesthetic predictor's backbone)
VIT_H14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
               image_size=224, projection_dim=1024)
VIT_L14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
               image_size=224, projection_dim=768)

# published sizes (parameters of the denoising transformer), for the sanity check
PUBLISHED_TRANSFORMER_PARAMS = {"sd3-medium": 2.03e9, "sd3.5-medium": 2.24e9, "sd3.5-large": 8.06e9,
                                "klein-base-4b": 3.9e9, "klein-base-9b": 9.1e9}
