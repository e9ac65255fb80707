"""Hugging Face integration: loading, saving and the ``from_pretrained`` plug-in."""
