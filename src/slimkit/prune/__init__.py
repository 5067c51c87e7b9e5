"""slimkit.prune."""
