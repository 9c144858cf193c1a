"""Saving, loading and exporting converted models."""

from .saving import load, save

__all__ = ["load", "save"]
