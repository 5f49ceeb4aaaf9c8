"""OpenAI-compatible HTTP server: FastAPI routes over an asyncio front (AsyncEngine) of the engine."""
