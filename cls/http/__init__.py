"""clsd's OpenAI-compatible HTTP front door, imported only when `http.port` is set: `server.py`
(FastAPI on uvicorn in clsd's event loop: the routes), `schema.py` (OpenAI request bodies ->
clsd's GenerateRequest, pure), `reply.py` (whole and streamed answers), `guard.py` (the ASGI
layer every request crosses: X-Request-Id, body timeout, error log lines and counts),
`limits.py` (connection cap, header timeout), `telemetry.py` (rate-limited log, the door's
counters), `model_info.py` (context length from the registered machines). Requests then take
the gRPC door's path: `ClusterState.admit` / `generate` in cls/service.py."""
