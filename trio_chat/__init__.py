"""trio-chat: a real-time chat API server on trio's structured concurrency."""

__version__ = "0.1.0"
