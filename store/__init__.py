"""Where saves live: crash-safe snapshots of named tensors and JSON state."""
