"""edgeprune: export vision-language models with a fixed visual-token budget to static graphs.

Importing this package is cheap: torch, transformers and onnx are imported only by the
stages that need them (see `edgeprune.cli`).
"""

__version__ = "0.1.0"
