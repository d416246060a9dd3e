"""Deployment: export to .pt2 / .onnx / .ts / .pth (checked against eager), load, and bench.
Builds on fxgndi.core only."""
