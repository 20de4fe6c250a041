"""LMCache below the pin connector: which tier holds a released prefix (``residency``), and
LMCache on vLLM's CPU build (``cpu_build`` selects ``cpu_paged_kv``'s torch-only connector)."""
