"""Tool-call-aware KV retention (Continuum's TTL pinning) as a plugin for unmodified vLLM."""

__version__ = "0.1.0"
