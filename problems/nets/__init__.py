"""Networks shared by the problems."""
