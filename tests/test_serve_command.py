"""``continuum-tiered serve`` runs vLLM with its own interpreter, the model positional."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from itertools import dropwhile
from pathlib import Path

import pytest

from continuum_tiered.cli import main
from continuum_tiered.vllm import serve
from continuum_tiered.vllm.serve import (
    VLLM_API_SERVER_MODULE,
    VLLM_CLI_MODULE,
    ServeOptions,
    vllm_server_command,
)

ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


class Exec(Exception):
    """Raised by the stand-in for ``os.execve``: the command serve would have run."""


def capture_exec(monkeypatch) -> list[list[str]]:
    calls: list[list[str]] = []

    def execve(path, argv, env):
        calls.append([path, *argv])
        raise Exec

    monkeypatch.setattr(serve.os, "execve", execve)
    return calls


def test_the_vllm_console_script_runs_the_cli_module_that_serve_runs():
    scripts = importlib.metadata.entry_points(group="console_scripts", name="vllm")
    assert [script.value for script in scripts] == [f"{VLLM_CLI_MODULE}:main"]
    for module in (VLLM_CLI_MODULE, VLLM_API_SERVER_MODULE):
        assert importlib.util.find_spec(module) is not None


def test_serve_on_the_cuda_build_runs_vllm_serve_with_this_interpreter(monkeypatch, capsys):
    monkeypatch.setattr(serve, "is_cpu_build", lambda: False)
    assert vllm_server_command("org/m") == [sys.executable, "-m", VLLM_CLI_MODULE, "serve", "org/m"]
    calls = capture_exec(monkeypatch)
    with pytest.raises(Exec):
        main(["serve", "org/m", "--port", "8001"])
    ((path, *argv),) = calls
    assert path == sys.executable
    assert argv[:5] == [sys.executable, "-m", VLLM_CLI_MODULE, "serve", "org/m"]
    assert "--model" not in argv  # deprecated for `vllm serve`: the model is positional
    assert argv[-2:] == ["--port", "8001"]
    out = capsys.readouterr().out
    assert "Running (this interpreter" in out
    plain = shlex.split(out.splitlines()[-1])
    assert plain[:3] == ["vllm", "serve", "org/m"] and "--model" not in plain


def test_serve_on_the_cpu_build_runs_the_server_module_which_needs_model_flag(monkeypatch):
    """The server module parses a positional model but drops it; it reads only --model."""
    monkeypatch.setattr(serve, "is_cpu_build", lambda: True)
    command = vllm_server_command("org/m")
    assert command == [sys.executable, "-m", VLLM_API_SERVER_MODULE, "--model", "org/m"]
    calls = capture_exec(monkeypatch)
    with pytest.raises(Exec):
        main(["serve", "org/m"])
    assert calls[0][0] == sys.executable and calls[0][1:6] == command


def test_flags_leave_the_model_to_the_command():
    flags = ServeOptions(model="org/m").vllm_flags()
    assert "--model" not in flags and "org/m" not in flags


def test_serve_dry_run_works_without_the_venv_on_path(tmp_path):
    script = Path(sys.executable).parent / "continuum-tiered"
    if not script.exists():
        pytest.skip(f"no {script}: the package is not installed in this interpreter's env")
    path = os.pathsep.join(
        d for d in os.defpath.split(os.pathsep) if d and Path(d) != script.parent
    )
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = path
    done = subprocess.run(
        [str(script), "serve", "org/m", "--dry-run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("Would run"))
    argv = list(dropwhile(ENV_ASSIGNMENT.match, shlex.split(lines[heading + 1])))
    interpreter = Path(argv[0])
    assert interpreter.is_absolute() and os.access(interpreter, os.X_OK)
    assert interpreter.parent == script.parent  # the venv's own python, not one from PATH
    assert argv[1] == "-m" and argv[2] in (VLLM_CLI_MODULE, VLLM_API_SERVER_MODULE)


def engine_config(options: ServeOptions):
    """vLLM's engine config from the flags serve passes, parsed by vLLM's own engine
    arguments (dummy weights, no tokenizer); with the flags the engine did not take."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args, rest = parser.parse_known_args(["--model", options.model, *options.vllm_flags()])
    args.load_format, args.skip_tokenizer_init = "dummy", True
    return AsyncEngineArgs.from_cli_args(args).create_engine_config(), rest


def test_the_flags_serve_passes_build_vllms_engine_config(tiny_model_dir):
    """What serve hands vLLM parses with vLLM's own engine arguments and builds an engine
    config with our connector and program-FCFS scheduling, on either build and without a
    GPU (the version matrix runs this under the CUDA wheel too). The two API-server flags
    left over are the server's, not the engine's."""
    config, rest = engine_config(ServeOptions(model=str(tiny_model_dir)))
    assert [f for f in rest if f.startswith("--")] == [
        "--middleware",
        "--enable-prompt-tokens-details",
    ]
    assert config.kv_transfer_config.kv_connector == "ContinuumConnector"
    assert config.scheduler_config.policy == "priority"


@pytest.mark.parametrize(("policy", "expected"), [(None, "none"), ("tiered", "tiered")])
def test_below_tiers_the_pins_are_off_unless_a_policy_is_given(tiny_model_dir, policy, expected):
    """The engine config serve builds with --tiers: ContinuumTieredConnector gives its
    ContinuumConnector child no pins (the ``none`` policy) when no policy was named, and
    keeps the one named."""
    from continuum_tiered.vllm.connectors.tiered_connector import default_pins_off
    from continuum_tiered.vllm.tiers import Tiers

    options = ServeOptions(model=str(tiny_model_dir), policy=policy, tiers=Tiers(cpu_bytes=2**30))
    config, _ = engine_config(options)
    default_pins_off(config)
    children = config.kv_transfer_config.kv_connector_extra_config["connectors"]
    (pin_child,) = [c for c in children if c["kv_connector"] == "ContinuumConnector"]
    assert pin_child["kv_connector_extra_config"]["policy"] == expected
    # The policy serve checks and reports is the one the connector takes.
    assert serve.check_policy(options).startswith(f"retention policy: {expected}")


def test_serve_refuses_a_profile_of_another_model_before_vllm_starts(
    tiny_model_dir, monkeypatch, capsys
):
    calls = capture_exec(monkeypatch)
    code = main(["serve", str(tiny_model_dir), "--profile", "h100-llama-3.1-70b-tp4"])
    assert code == 2 and calls == []
    err = capsys.readouterr().err
    assert "h100-llama-3.1-70b-tp4.json was measured for model llama-3.1-70b-tp4" in err
    assert "(shape layers=80, kv_heads=2, head_dim=128, dtype_bytes=2)" in err
    assert f"runs {tiny_model_dir} (shape layers=2, kv_heads=1, head_dim=64" in err


def test_serve_checks_the_profile_against_the_dtype_vllm_will_run(tiny_model_dir, capsys):
    model = str(tiny_model_dir)
    assert main(["serve", model, "--profile", "cpu-tiny-llama", "--dry-run"]) == 0
    assert main(["serve", model, "--profile", "cpu-tiny-llama", "--dtype=float32"]) == 2
    assert "dtype_bytes=4" in capsys.readouterr().err
    assert serve.served_dtype_bytes(["--dtype", "float32"]) == 4
    assert serve.served_dtype_bytes(["--dtype", "bfloat16", "--port", "1"]) == 2
    assert serve.served_dtype_bytes([]) == serve.served_dtype_bytes(["--dtype"]) == 2


def test_serve_leaves_the_check_to_the_connector_without_the_models_config(tmp_path, capsys):
    """A model whose config cannot be read here (no folder, not a hub id): the profile is
    still read and validated, its shape checked when the engine starts."""
    missing = str(tmp_path / "no-such-model")
    assert main(["serve", missing, "--profile", "h100-llama-3.1-70b-tp4", "--dry-run"]) == 0
    assert "the connector checks the profile" in capsys.readouterr().err
    assert main(["serve", missing, "--profile", "no-such-profile", "--dry-run"]) == 2


@pytest.mark.parametrize(
    ("flags", "warned"),
    [
        (["--api-server-count", "2"], True),
        (["--api-server-count=4"], True),
        (["--api-server-count", "1"], False),
        (["--api-server-count", "2", "--program-identity", "hints"], False),
    ],
)
def test_serve_warns_that_conversations_do_not_span_api_servers(flags, warned, capsys):
    assert main(["serve", "some/model", "--dry-run", *flags]) == 0
    assert ("each API server process keeps its own" in capsys.readouterr().err) is warned
