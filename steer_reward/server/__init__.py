"""The reward server (``steer-reward serve``): FastAPI app, cross-request batcher, OpenRLHF protocol, metrics.

Importing this package imports no web framework; ``app.create_app`` does, when a server is built.
"""
