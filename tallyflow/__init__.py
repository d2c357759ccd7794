"""The `tallyflow` command: the front door to every dataflow, operations tool and the local
development kit. It sits on top of everything else (see ARCHITECTURE.md)."""

from importlib.metadata import version

__version__ = version("tallyflow")
