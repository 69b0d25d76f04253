"""Evaluation: scene checks (colour segmentation against exact scene metadata)."""
