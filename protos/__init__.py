"""The wire contract of Lepton FL: proto package `leptonfl.v1` and the tensor codec.

Imports nothing else of ours, so both the server and the client SDK can depend on it.
"""

PROTOCOL_VERSION = 1
