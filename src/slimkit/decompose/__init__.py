"""slimkit.decompose."""
