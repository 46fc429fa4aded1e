"""Restore operations: files (and later VM images and checkpoints) back out of the repository."""
