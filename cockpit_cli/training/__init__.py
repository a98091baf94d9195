"""The training side: building a run from its config, and the loop that trains it."""
