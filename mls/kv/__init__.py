"""KV transfer between machines: one interface, several transports (see base.py)."""
