"""Hozon: deduplicated, compressed, encrypted backups for virtualized estates."""

__version__ = "0.1.0"
