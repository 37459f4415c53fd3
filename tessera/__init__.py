"""Tessera: LAION-scale image-text curation and LlamaGen-style text-to-image training."""
