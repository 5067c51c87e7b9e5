"""slimkit.export."""
