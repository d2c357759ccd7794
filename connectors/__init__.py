"""The Bytewax seam: sources, sinks and stateful steps that adapt `operators/` and `sinks/`
to Bytewax. With `dataflows/`, the only code that imports Bytewax."""
