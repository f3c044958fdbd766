"""Representation analysis: CKA and occlusion invariance."""

from mimjax.analysis.cka import cka_matrix
from mimjax.analysis.cka import hsic_unbiased
from mimjax.analysis.cka import linear_cka
from mimjax.analysis.cka import MinibatchCKA
from mimjax.analysis.invariance import occlusion_invariance
