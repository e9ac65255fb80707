"""Monarch matrices in plain PyTorch: the layout, the layer and the optimal projection.

Nothing in this package knows about transformers or the command line.
"""

from monarchify.monarch.layer import MonarchLinear
from monarchify.monarch.layout import MonarchLayout
from monarchify.monarch.projection import Projection, project

__all__ = ["MonarchLayout", "MonarchLinear", "Projection", "project"]
