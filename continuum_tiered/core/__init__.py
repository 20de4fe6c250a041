"""What the plugin decides, with no vLLM in sight: plain Python and numpy.

Hints a request carries (``hints``), the program table (``programs``), pins (``pins``),
the per-tool duration model (``tool_durations``), the TTL cost model (``ttl``), the tier
profile schema (``profile``), where a deployment's profile comes from (``profile_source``)
and what LMCache's tiers cost to load from (``tier_model``), model shapes
(``model_shapes``, ``roofline``, ``deployment``), request bodies and API-key scoping
(``request_body``, ``tenancy``), run metrics and their plots (``metrics``, ``plots``).
Below every tool that starts processes: free ports (``net``), a server child process run
until healthy (``server_process``) and the tiny random Llama of the CPU runs (``tiny_model``).
"""
