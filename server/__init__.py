"""The HTTP layer: the server object (state + route table, built by server.app.build_server), the request handler,
and the routes grouped by dialect (routes_kobold, routes_openai, routes_ollama, routes_static)."""
