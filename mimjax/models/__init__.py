"""Flax linen models: ViT encoder, MAE decoder, classifier heads."""

from mimjax.models.classifier import Classifier, LinearProbe, ProbedEncoder
from mimjax.models.decoder import Decoder
from mimjax.models.vit import (Encoder, PRESETS, patchify, posemb_sincos_2d,
                               preset, unpatchify)
