"""Everything that touches vLLM or LMCache: the general plugin (``plugin``), the
``continuum-tiered serve`` command (``serve``, ``tiers``, ``middleware``), the KV connectors
(``connectors/``), LMCache's side (``lmcache/``) and every private name either relies on
(``compat``)."""
