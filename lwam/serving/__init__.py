"""``lwam serve``: the websocket policy server (server.py, openpi protocol) and its wire codec (codec.py,
msgpack with numpy arrays; never unpickles)."""
