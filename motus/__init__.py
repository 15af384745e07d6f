"""Motus training platform: versioned data tiers -> three training stages -> gated, lineage-tracked models."""

__version__ = "0.1.0"
