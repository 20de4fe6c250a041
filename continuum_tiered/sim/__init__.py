"""Virtual-time replay on vLLM's real scheduler with a modelled GPU clock
(``continuum-tiered simulate``): ``virtual_engine`` runs the loop, ``scheduler_driver`` drives
vLLM's scheduler, ``lmcache_model`` and ``tier_links`` model LMCache's tiers and links,
``step_time`` the forward pass, ``peers`` the systems compared, ``simulate`` one run;
``cluster`` runs N replicas behind a router (``routing``) with a ``shared_tier``."""
