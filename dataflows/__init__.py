"""Bytewax wiring: sources, sinks and the dataflows that connect them to `operators/`."""
