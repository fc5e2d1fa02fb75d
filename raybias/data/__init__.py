"""Datasets in the one raybias schema."""
