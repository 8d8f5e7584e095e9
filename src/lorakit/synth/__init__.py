"""Synthetic training rows from the base model itself: replay answers and self-distilled rewrites."""
