"""Backup operations: files (and later VM images and checkpoints) through the blob pipeline."""
