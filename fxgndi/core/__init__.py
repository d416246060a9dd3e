"""Shared utilities at the bottom of fxgndi: errors, the vocabulary, run options, data streams,
statistics, devices, costs, tables and atomic files. Imports nothing from the rest of fxgndi."""
