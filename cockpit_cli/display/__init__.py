"""What the user sees while a run trains (no torch imports)."""
