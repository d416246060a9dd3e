"""G-NDI: readouts, tangents (reverse / forward / probe), exact ablations, the run loop
(accumulation, run states, distributed shards, memory plan), Scores, validity against the
exact effects, and the classic criteria. Builds on fxgndi.fx and fxgndi.core."""
