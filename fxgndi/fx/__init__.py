"""torch.fx: tracing, graph analyses, site selection, intervention nodes with their baselines,
and consumer taps. Builds on fxgndi.core only."""
