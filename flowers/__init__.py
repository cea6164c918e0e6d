"""flowers."""
