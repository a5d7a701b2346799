"""Figures, per-experiment metrics tables and the cross-experiment summary."""
