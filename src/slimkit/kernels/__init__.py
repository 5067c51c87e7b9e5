"""slimkit.kernels."""
