"""mimjax: masked image modeling in JAX/Flax, as occlusion-invariant learning."""

__version__ = '0.1.0'
