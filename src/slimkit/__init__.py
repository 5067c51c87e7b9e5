"""slimkit: make convolutional networks small and fast enough for embedded deployment.

Importing the package is light: submodules (and torch extensions such as ONNX export)
are imported only when used.
"""

__version__ = "0.1.0"
