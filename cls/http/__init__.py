"""clsd's OpenAI-compatible HTTP front door: `server.py` (FastAPI on uvicorn in clsd's event
loop; imported only when `http.port` is set) and `schema.py` (OpenAI request bodies -> clsd's
GenerateRequest, pure). Requests then take the gRPC door's path: `ClusterState.admit` /
`generate` in cls/service.py."""
