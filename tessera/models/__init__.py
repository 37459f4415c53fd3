"""Torch modules and their weight loaders. No Ray or Prefect in here."""
