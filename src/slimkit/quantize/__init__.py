"""slimkit.quantize."""
