"""What a job is: its spec, its model and data, and the training loop."""
