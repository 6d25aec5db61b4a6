"""thawed HTTP server (see issue: server)."""
