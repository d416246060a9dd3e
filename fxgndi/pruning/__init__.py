"""Pruning: width pruning on torch-pruning ranked by G-NDI (or its own criteria), per-family
architecture handling, repair (bias folding, BatchNorm recalibration, fine-tuning), and depth
pruning of residual blocks. torch-pruning's internals are reached through _tp only. Builds on
fxgndi.gndi, fxgndi.deploy, fxgndi.fx and fxgndi.core."""
