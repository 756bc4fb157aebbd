"""`camface serve`: the live demo in a web browser. The page sends camera frames over a
WebSocket; the server detects, explains (one graph call for all clients' frames), draws with
the live loop's renderer and sends the annotated frames back (see protocol.py)."""
