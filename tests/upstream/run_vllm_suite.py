"""Run vLLM's own scheduler and prefix-caching tests with ContinuumConnector attached.

vLLM's ``tests/v1/core/test_scheduler.py`` and ``tests/v1/core/test_prefix_caching.py``
come from the source distribution of the installed vLLM version, downloaded from the
package index pip uses and cached under ``.cache/vllm-upstream/`` (never committed). They
run once per variant (see ``continuum_attach.py``):

- ``baseline``: vLLM's tests as they are, in this environment (no connector);
- ``a``: ContinuumConnector attached to every scheduler the tests build, requests
  without hints;
- ``b``: as ``a``, every request carrying program hints, with the ``static-ttl`` policy
  (TTL 3600 s) so every hinted turn that ends normally with full hashed blocks is pinned
  (the default policy pins nothing for the tests' few-block prompts);
- ``c``: as ``b``, plus pins of fake programs seeded over every free block of the pool
  right after the scheduler is built, so admission and running requests go through the
  connector's pressure paths.

The failures are compared with ``vllm-scheduler-expectations.txt`` beside this file: the
run fails on a failure not listed there for that variant, and on a listed failure that
now passes, so the list stays honest. Exit status 0 only when every variant matches; 3
when vLLM's source distribution can be neither found in the cache nor downloaded; 4 when
the installed vLLM is not the version the expectations were written for.

Usage: ``python tests/upstream/run_vllm_suite.py [--variants a,b] [--jobs 2] [--rev REV]
[--seed-pin-blocks N] [--extra-config JSON] [-k EXPR]``;
``scripts/run-vllm-scheduler-tests.sh`` runs it with the venv.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
EXPECTATIONS = HERE / "vllm-scheduler-expectations.txt"
CACHE = REPO / ".cache" / "vllm-upstream"
TEST_FILES = ("tests/v1/core/test_scheduler.py", "tests/v1/core/test_prefix_caching.py")
VARIANTS = ("baseline", "a", "b", "c")
PINNING_POLICY = {"policy": "static-ttl", "policy_options": {"ttl_s": 3600.0}}
VARIANT_EXTRA_CONFIG: dict[str, dict[str, object]] = {
    "baseline": {},
    "a": {},
    "b": PINNING_POLICY,
    "c": PINNING_POLICY,
}
SEED_FRACTION = 1.0  # variant c: the seeded pins take every free block
SEED_PIN_BLOCKS = 8  # ... in pins of this many blocks, so each release frees little
# Offline Hugging Face configs for the two models the tests name: the tests only read
# their architecture (no weights, no tokenizer), and this machine cannot reach the Hub.
HF_CONFIGS: dict[str, dict[str, object]] = {
    "facebook/opt-125m": {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "activation_function": "relu",
        "hidden_size": 768,
        "ffn_dim": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 2048,
        "vocab_size": 50272,
        "word_embed_proj_dim": 768,
        "do_layer_norm_before": True,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float16",
    },
    "llava-hf/llava-1.5-7b-hf": {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": 32000,
        "projector_hidden_act": "gelu",
        "pad_token_id": 32001,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "text_config": {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 4096,
            "vocab_size": 32064,
            "rms_norm_eps": 1e-5,
            "torch_dtype": "float16",
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
    },
}
HF_REVISION = "0" * 40
EXIT_NO_SDIST = 3  # the test files could not be fetched (no network, no cache)
EXIT_OTHER_VERSION = 4  # the installed vLLM is not the version the expectations are for


# ----------------------------------------------------------------------- expectations


@dataclass
class Expectations:
    vllm_version: str
    needs_torchvision: list[str] = field(default_factory=list)
    # variant -> node id -> reason
    failures: dict[str, dict[str, str]] = field(default_factory=dict)


def read_expectations(path: Path = EXPECTATIONS) -> Expectations:
    """Sections: ``vllm VERSION``; ``[needs-torchvision]`` (node ids, deselected where
    torchvision does not import); ``[expected-failures]``: ``VARIANTS NODE_ID REASON``
    with VARIANTS a comma list of variants or ``*`` for all four."""
    version = ""
    section = ""
    exp = Expectations(vllm_version="")
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if not section:
            key, _, value = line.partition(" ")
            if key == "vllm":
                version = value.strip()
            continue
        if section == "needs-torchvision":
            exp.needs_torchvision.append(line)
        elif section == "expected-failures":
            parts = line.split(None, 2)
            if len(parts) != 3:
                raise SystemExit(f"{path}:{lineno}: want VARIANTS NODE_ID REASON")
            variants = VARIANTS if parts[0] == "*" else tuple(parts[0].split(","))
            for variant in variants:
                if variant not in VARIANTS:
                    raise SystemExit(f"{path}:{lineno}: unknown variant {variant!r}")
                exp.failures.setdefault(variant, {})[parts[1]] = parts[2]
        else:
            raise SystemExit(f"{path}:{lineno}: unknown section [{section}]")
    exp.vllm_version = version
    return exp


# ------------------------------------------------------------------- vLLM's test files


def installed_vllm_version(python: str) -> str:
    """vLLM's ``__version__`` in ``python``'s environment, read without importing vLLM."""
    code = (
        "import importlib.util, pathlib, re;"
        "s = importlib.util.find_spec('vllm');"
        "t = pathlib.Path(s.submodule_search_locations[0], '_version.py').read_text();"
        "print(re.search(r\"__version__ = version = '([^']+)'\", t).group(1))"
    )
    return subprocess.run(
        [python, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def _pip_setting(python: str, name: str) -> str | None:
    env_name = "PIP_" + name.upper().replace("-", "_")
    if os.environ.get(env_name):
        return os.environ[env_name]
    out = subprocess.run(
        [python, "-m", "pip", "config", "get", f"global.{name}"],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        return None
    return out.stdout.strip().strip("'\"") or None


def _index_url(python: str) -> str:
    """The index pip uses: its configured index-url, else pip's own default."""
    configured = _pip_setting(python, "index-url")
    if configured:
        return configured.rstrip("/")
    code = "from pip._internal.models.index import PyPI; print(PyPI.simple_url)"
    return subprocess.run(
        [python, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def _ssl_context(python: str) -> ssl.SSLContext:
    cafile = _pip_setting(python, "cert")
    return ssl.create_default_context(cafile=cafile if cafile else None)


def find_sdist(python: str, version: str) -> tuple[str, str]:
    """URL and sha256 of ``vllm-VERSION.tar.gz`` from the index's simple API (JSON)."""
    index = _index_url(python)
    request = urllib.request.Request(
        f"{index}/vllm/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, context=_ssl_context(python), timeout=120) as r:
        files = json.load(r)["files"]
    name = f"vllm-{version}.tar.gz"
    for entry in files:
        if entry["filename"] == name:
            return entry["url"], entry["hashes"]["sha256"]
    raise SystemExit(f"the package index has no {name} (vLLM's source distribution)")


def ensure_sdist_tests(python: str, version: str, sdist: Path | None = None) -> Path:
    """``CACHE/vllm-VERSION`` holding the sdist's ``tests/``; downloaded on first use."""
    root = CACHE / f"vllm-{version}"
    stamp = root / ".complete"
    if stamp.exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        url, sha256 = find_sdist(python, version)
        sdist = CACHE / f"vllm-{version}.tar.gz"
        print(f"downloading vLLM {version}'s source distribution ...", flush=True)
        digest = hashlib.sha256()
        with (
            urllib.request.urlopen(url, context=_ssl_context(python), timeout=600) as r,
            open(sdist, "wb") as f,
        ):
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != sha256:
            sdist.unlink()
            raise SystemExit(f"{url}: sha256 mismatch")
    if root.exists():
        shutil.rmtree(root)
    prefix = f"vllm-{version}/"
    with tarfile.open(sdist) as tar:
        pkg_info = tar.extractfile(prefix + "PKG-INFO")
        assert pkg_info is not None
        match = re.search(r"^Version: (\S+)$", pkg_info.read().decode(), re.MULTILINE)
        if match is None or match.group(1) != version:
            raise SystemExit(f"{sdist}: PKG-INFO says version {match and match.group(1)}")
        members = [m for m in tar.getmembers() if m.name.startswith(prefix + "tests/")]
        tar.extractall(CACHE, members=members, filter="data")
    # rootdir of the runs: stops pytest from reading our pyproject's settings
    (root / "pytest.ini").write_text("[pytest]\n")
    stamp.write_text(version + "\n")
    return root


def ensure_hf_cache() -> Path:
    """A Hugging Face hub cache with the configs of the models the tests name."""
    hub = CACHE / "hf-hub"
    for name, config in HF_CONFIGS.items():
        repo = hub / ("models--" + name.replace("/", "--"))
        snapshot = repo / "snapshots" / HF_REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(json.dumps(config, indent=1))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(HF_REVISION)
    return hub


def export_revision(rev: str) -> Path:
    """``continuum_tiered`` as committed at ``rev``, to run against instead of the tree."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    out = CACHE / "src" / commit
    if not (out / "continuum_tiered").exists():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "continuum_tiered"],
            check=True,
            capture_output=True,
        ).stdout
        with tempfile.TemporaryFile() as f:
            f.write(archive)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(out, filter="data")
    return out


def torchvision_imports(python: str) -> bool:
    return (
        subprocess.run(
            [python, "-c", "import torchvision.ops"], capture_output=True, timeout=300
        ).returncode
        == 0
    )


# ------------------------------------------------------------------------------ runs


@dataclass
class RunResult:
    variant: str
    returncode: int
    seconds: float
    tests: dict[str, dict[str, Any]]
    deselected: list[str]
    log: Path


def run_variant(
    variant: str,
    python: str,
    root: Path,
    hub: Path,
    out: Path,
    deselect: Path,
    extra_config: dict[str, object] | None,
    src: Path | None,
    pytest_args: list[str],
    seed_pin_blocks: int = SEED_PIN_BLOCKS,
) -> RunResult:
    report = out / f"{variant}.json"
    log = out / f"{variant}.log"
    report.unlink(missing_ok=True)
    pythonpath = [str(HERE)]
    if src is not None:
        pythonpath.insert(0, str(src))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(pythonpath),
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "CONTINUUM_UPSTREAM_VARIANT": variant,
        "CONTINUUM_UPSTREAM_REPORT": str(report),
        "CONTINUUM_UPSTREAM_DESELECT": str(deselect),
        "CONTINUUM_UPSTREAM_EXTRA": json.dumps(
            VARIANT_EXTRA_CONFIG[variant] if extra_config is None else extra_config
        ),
        "CONTINUUM_UPSTREAM_SEED_FRACTION": str(SEED_FRACTION),
        "CONTINUUM_UPSTREAM_SEED_PIN_BLOCKS": str(seed_pin_blocks),
    }
    cmd = [
        python,
        "-m",
        "pytest",
        *TEST_FILES,
        "-q",
        "-p",
        "no:cacheprovider",
        "--noconftest",  # vLLM's conftest needs its test requirements; ours stands in
        "-p",
        "continuum_attach",
        "--rootdir",
        str(root),
        *pytest_args,
    ]
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    data = json.loads(report.read_text()) if report.exists() else {}
    return RunResult(
        variant, proc.returncode, seconds, data.get("tests", {}), data.get("deselected", []), log
    )


def compare(result: RunResult, expected: dict[str, str], subset: bool) -> bool:
    failed = {k for k, v in result.tests.items() if v["outcome"] == "failed"}
    passed = {k for k, v in result.tests.items() if v["outcome"] == "passed"}
    skipped = {k for k, v in result.tests.items() if v["outcome"] == "skipped"}
    as_expected = failed & expected.keys()
    unexpected = sorted(failed - expected.keys())
    now_passing = sorted(expected.keys() & passed)
    deselected = set(result.deselected)
    not_run = (
        []
        if subset
        else sorted(k for k in expected if k not in result.tests and k not in deselected)
    )
    records = [v.get("connector", {}) for v in result.tests.values()]
    attached = sum(1 for r in records if r.get("schedulers_with_connector"))
    pinned = sum(1 for r in records if r.get("pins_created"))
    pressure = sum(1 for r in records if r.get("pin_releases", {}).get("pressure"))
    print(
        f"variant {result.variant}: {len(passed)} passed, {len(as_expected)} failed as "
        f"expected, {len(unexpected)} unexpected failures, {len(now_passing)} expected "
        f"failures now passing, {len(skipped)} skipped, {len(deselected)} deselected "
        f"({result.seconds:.0f} s). Tests whose scheduler had the connector: {attached}; "
        f"with pins: {pinned}; with pins released under pressure: {pressure}"
    )
    ok = True
    if not result.tests:
        print(f"  no results: pytest exited {result.returncode}; see {result.log}")
        return False
    for node in unexpected:
        entry = result.tests[node]
        message = str(entry.get("message", "")).strip().splitlines()
        print(f"  UNEXPECTED FAILURE {node} ({entry.get('phase')}, {entry.get('where')})")
        for line in message[:6]:
            print(f"      {line}")
        print(f"      connector: {json.dumps(entry.get('connector', {}), sort_keys=True)}")
        ok = False
    for node in now_passing:
        print(f"  NOW PASSING (remove it from the expectations): {node}")
        ok = False
    for node in not_run:
        print(f"  EXPECTED FAILURE NOT RUN (renamed or removed?): {node}")
        ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="variants run at once")
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--rev", help="run against continuum_tiered as committed at REV")
    parser.add_argument("--sdist", type=Path, help="a local vllm-VERSION.tar.gz")
    parser.add_argument("--extra-config", type=json.loads, help="kv_connector_extra_config (JSON)")
    parser.add_argument(
        "--seed-pin-blocks", type=int, default=SEED_PIN_BLOCKS, help="variant c's pin size"
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument(
        "--any-version",
        action="store_true",
        help="run against an installed vLLM other than the expectations' version",
    )
    parser.add_argument("--out", type=Path, default=CACHE / "results")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()  # the runs' working directory is vLLM's tree

    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {VARIANTS}")
    exp = read_expectations()
    version = installed_vllm_version(args.python)
    if version != exp.vllm_version:
        print(
            f"the installed vLLM is {version}; the expectations are for vLLM "
            f"{exp.vllm_version}" + ("" if args.any_version else " (--any-version runs anyway)")
        )
        if not args.any_version:
            return EXIT_OTHER_VERSION
    try:
        root = ensure_sdist_tests(args.python, version, args.sdist)
    except OSError as err:  # no route to the index (urllib's URLError is an OSError)
        print(f"cannot fetch vLLM {version}'s source distribution: {err}")
        return EXIT_NO_SDIST
    hub = ensure_hf_cache()
    src = export_revision(args.rev) if args.rev else None
    args.out.mkdir(parents=True, exist_ok=True)
    deselected: list[str] = []
    if exp.needs_torchvision and not torchvision_imports(args.python):
        deselected = exp.needs_torchvision
        print(
            "torchvision does not import here: the tests listed under [needs-torchvision] "
            "(vLLM's llava model code needs it) are deselected"
        )
    deselect_file = args.out / "deselect.txt"
    deselect_file.write_text("".join(f"{node}\n" for node in sorted(deselected)))
    pytest_args: list[str] = []
    keyword = args.keyword
    if keyword:
        pytest_args += ["-k", keyword]
    where = f"continuum_tiered at {args.rev}" if args.rev else "the working tree"
    print(f"vLLM {version}: {', '.join(TEST_FILES)} against {where}, variants {variants}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [
            pool.submit(
                run_variant,
                v,
                args.python,
                root,
                hub,
                args.out,
                deselect_file,
                args.extra_config,
                src,
                pytest_args,
                args.seed_pin_blocks,
            )
            for v in variants
        ]
        results = [f.result() for f in futures]
    ok = True
    for result in results:
        expected = exp.failures.get(result.variant, {})
        if keyword:  # a subset: only expectations of tests that ran are checked
            expected = {k: v for k, v in expected.items() if k in result.tests}
        ok &= compare(result, expected, subset=bool(keyword))
    print("all variants match the expectations" if ok else "MISMATCH with the expectations")
    print(f"reports: {args.out}/<variant>.json and .log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
