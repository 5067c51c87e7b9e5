"""slimkit.encode."""
