"""traind's performance claims, each measured as a ratio against a baseline in one run."""
