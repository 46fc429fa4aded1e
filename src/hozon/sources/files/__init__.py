"""Reading a file system for a file-level backup: metadata, extended attributes, sparse extents, stalled reads."""
