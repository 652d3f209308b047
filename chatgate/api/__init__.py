"""HTTP API: ``/v1/*`` (OpenAI-compatible), ``/api/*`` (management), ops endpoints."""
