"""Exec, Attach and PortForward: the CRI handlers and the streaming server behind them.

Importing the package registers the handlers (services/crigw/server.py
imports it as the streaming area); crigw's main starts the server with
`start_streaming_server(gateway)`.
"""

from services.crigw.streaming.handlers import start_streaming_server

__all__ = ["start_streaming_server"]
