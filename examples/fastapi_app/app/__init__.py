"""A FastAPI backend that runs an agent and streams its progress through Flushline."""
