"""The driver half: what a user's program calls to submit a batch and gather its results."""
