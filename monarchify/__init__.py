"""monarchify: make pretrained transformers smaller and faster with Monarch matrices.

>>> import monarchify
>>> report = monarchify.convert(model, monarchify.MonarchConfig(nblocks=4))
>>> monarchify.save(model, "out/")                  # loads back with stock from_pretrained
>>> model = monarchify.load("out/")
"""

from monarchify.config import MonarchConfig
from monarchify.errors import MonarchifyError
from monarchify.hf import plugin as _plugin
from monarchify.hf.checkpoint import load_model as load
from monarchify.hf.checkpoint import read_report
from monarchify.hf.checkpoint import save_model as save
from monarchify.monarch import MonarchLinear, Projection, project
from monarchify.report import ConversionReport
from monarchify.surgery import convert, dry_run

__version__ = "0.1.0"

_plugin.register()

__all__ = [
    "ConversionReport",
    "MonarchConfig",
    "MonarchLinear",
    "MonarchifyError",
    "Projection",
    "__version__",
    "convert",
    "dry_run",
    "load",
    "project",
    "read_report",
    "save",
]
