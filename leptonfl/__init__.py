"""The `leptonfl` command: one entry point over the server, client SDK and simulation harness."""

__version__ = "0.1.0"
