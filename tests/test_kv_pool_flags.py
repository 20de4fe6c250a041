"""``--kv-blocks`` of the demo and the CPU experiments (issue 18): a pool larger than the
random model's positions starts (requests capped at the positions, with a note), a pool too
small for the programs fails with one line before any server starts.

vLLM's own config validation is run on the flags (no engine is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from continuum_tiered.cli import main
from continuum_tiered.core.server_process import tiny_engine_flags, tiny_max_model_len
from continuum_tiered.core.tiny_model import write_tiny_llama
from continuum_tiered.lab.experiment import DEMO_SHAPE, check_cpu_pool
from continuum_tiered.traces.model import TraceProgram, Turn


def program(*turns: tuple[int, int]) -> TraceProgram:
    return TraceProgram("p", tuple(Turn(prompt, output, None, 0.0) for prompt, output in turns))


def vllm_engine_config(model_dir: Path, flags: list[str]):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(model_dir), *flags])
    return EngineArgs.from_cli_args(args).create_engine_config()


def test_a_pool_beyond_the_models_positions_starts_with_requests_capped(tmp_path):
    model = write_tiny_llama(tmp_path / "model", DEMO_SHAPE)
    assert tiny_max_model_len(model, 256) == 255 * 32
    assert tiny_max_model_len(model, 4096) == DEMO_SHAPE.max_position_embeddings
    config = vllm_engine_config(model, tiny_engine_flags(model, 4096))
    assert config.model_config.max_model_len == DEMO_SHAPE.max_position_embeddings
    assert config.cache_config.num_gpu_blocks_override == 4096
    # What the demo passed before: vLLM refuses it (the pydantic traceback of the issue).
    old = tiny_engine_flags(model, 4096)
    old[old.index("--max-model-len") + 1] = str(4095 * 32)
    with pytest.raises(Exception, match=r"max_model_len|max_position_embeddings"):
        vllm_engine_config(model, old)


def test_the_note_says_the_pool_keeps_its_blocks_and_requests_are_capped():
    note = check_cpu_pool(4096, [program((3000, 100))])
    assert note is not None and "all 4096 blocks" in note and "--max-model-len 8192" in note
    assert check_cpu_pool(256, [program((3000, 100))]) is None


@pytest.mark.parametrize(
    ("kv_blocks", "turns", "message"),
    [
        (1, [(10, 1)], "--kv-blocks must be at least 2, got 1"),
        (0, [(10, 1)], "--kv-blocks must be at least 2, got 0"),
        (64, [(3000, 100)], "longest turn (3100 tokens); use --kv-blocks 98 or more"),
        (4096, [(9000, 100)], "more than the random model's 8192 positions; lower --token-scale"),
    ],
)
def test_a_pool_too_small_for_the_programs_is_one_clear_error(kv_blocks, turns, message):
    with pytest.raises(ValueError) as info:
        check_cpu_pool(kv_blocks, [program(*turns)])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_demo_fails_in_one_line_before_starting_a_server(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--kv-blocks", "20", "--out", str(out), "--programs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("continuum-tiered demo: error: --kv-blocks 20 holds 608 tokens")
    assert len(err.splitlines()) == 1
    assert not out.exists()  # nothing written, no server started
