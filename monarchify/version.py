"""The package's version, in a module of its own so that any layer can record it (a saved
recipe, a folder, a results file) without importing the package root, which sits above them."""

__version__ = "0.1.0"
