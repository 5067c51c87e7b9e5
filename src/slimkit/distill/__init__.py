"""slimkit.distill."""
