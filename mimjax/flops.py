"""Model FLOPs and chips' peaks: the one count behind `make bench`,
benchmarks/gpu_check.py and `mimjax.tools.scaling`.

Matmul FLOPs only (a multiply-add is 2 FLOPs); norms, softmax, GELU and
residuals, O(N·D), are left out. Training = 3 × forward (the backward pass
costs twice the forward), the convention of model-FLOPs utilisation (MFU).
"""

from __future__ import annotations

from mimjax import masking
from mimjax.models import vit

# Dense bfloat16 peak TFLOP/s per chip (one JAX device), matched against
# `device.device_kind`; the first key found wins (TPU v5e reports itself as
# 'TPU v5 lite', v5p as 'TPU v5'). TPU v4 and v5p: per chip of two
# TensorCores; H100 / H200: SXM.
PEAK_TFLOPS = (('H100', 989.0), ('H200', 989.0), ('A100', 312.0),
               ('TPU v5 lite', 197.0), ('TPU v5e', 197.0),
               ('TPU v5p', 459.0), ('TPU v5', 459.0), ('TPU v4', 275.0))


def peak_tflops(device_kind: str) -> float | None:
  """The chip's dense bf16 peak, None when unknown (CPUs among them)."""
  return next((v for k, v in PEAK_TFLOPS if k in device_kind), None)


def block_flops(tokens: int, width: int, mlp_ratio: float = 4.0) -> int:
  """Forward FLOPs of one Transformer block on one image: q, k, v and out
  projections 8·N·D², the MLP 4·r·N·D², attention scores and weighted sum
  4·N²·D."""
  linear = 2 * tokens * (4 * width * width + 2 * mlp_ratio * width * width)
  return int(linear + 4 * tokens * tokens * width)


def mae_flops(size: str, patch: int, image_size: int = 224,
              mask_ratio: float = 0.75, decoder_width: int = 512,
              decoder_depth: int = 8, channels: int = 3) -> dict:
  """Per image, MAE pre-training: the patch embedding and the encoder on the
  visible patches (+ cls), the decoder's input projection on those, its
  blocks on every patch + cls, and its pixel head on every token. (The
  reference embeds every patch before masking; mimjax embeds only the kept
  ones, the same map.)"""
  width, depth, _ = vit.PRESETS[size]
  patches = (image_size // patch) ** 2
  encoder_tokens = masking.num_kept(patches, mask_ratio) + 1
  decoder_tokens = patches + 1
  pixels = patch * patch * channels
  encoder = (2 * (encoder_tokens - 1) * pixels * width
             + depth * block_flops(encoder_tokens, width))
  decoder = (2 * encoder_tokens * width * decoder_width
             + decoder_depth * block_flops(decoder_tokens, decoder_width)
             + 2 * decoder_tokens * decoder_width * pixels)
  return dict(encoder_tokens=encoder_tokens, decoder_tokens=decoder_tokens,
              encoder=encoder, decoder=decoder, forward=encoder + decoder,
              train=3 * (encoder + decoder))


def classifier_flops(size: str, patch: int, image_size: int = 224,
                     num_classes: int = 1000, channels: int = 3) -> dict:
  """Per image, fine-tuning: the encoder on every patch + cls and the
  linear head."""
  width, depth, _ = vit.PRESETS[size]
  patches = (image_size // patch) ** 2
  forward = (2 * patches * patch * patch * channels * width
             + depth * block_flops(patches + 1, width)
             + 2 * width * num_classes)
  return dict(forward=forward, train=3 * forward)
