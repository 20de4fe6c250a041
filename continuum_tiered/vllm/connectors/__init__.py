"""vLLM KV connectors. Importing this package requires vLLM; the core library does not."""
