"""Who runs jobs: the CLI, the foreground runner and (later) the daemon."""
