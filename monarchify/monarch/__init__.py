"""Monarch matrices in plain PyTorch: the layout, the layer and the optimal projection.

Nothing in this package knows about transformers or the command line.
"""

from monarchify.monarch.layer import STRUCTURED_LAYERS, LowRankLinear, MonarchLinear
from monarchify.monarch.layout import MonarchLayout
from monarchify.monarch.projection import Projection, project

__all__ = ["STRUCTURED_LAYERS", "LowRankLinear", "MonarchLayout", "MonarchLinear", "Projection", "project"]
