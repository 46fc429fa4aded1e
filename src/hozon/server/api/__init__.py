"""The server's HTTPS API (FastAPI): storage for agents, the agent protocol, admin routes, metrics."""
