"""The OpenAI-compatible HTTP front: the ASGI app (`app`) with one module per endpoint
(`endpoints`), its metrics and stored responses, and its deployment on Ray Serve
(`serve_app`, `serve`)."""
