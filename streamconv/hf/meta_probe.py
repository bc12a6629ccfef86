"""Asking transformers which weights a config.json's model loads, without importing torch here.

`meta_model.py` runs in a child process (this interpreter, `python -c` + runpy so that neither the current folder
nor `streamconv/hf/` shadows a library module), builds the model on the meta device and answers in JSON. The child
is time-bound (`STREAMCONV_META_TIMEOUT_S`, default `DEFAULT_TIMEOUT_S`): transformers' import alone takes 5-20 s
on a loaded machine, and an absurd config must not hang a conversion. The answer is checked for type and size
before use.

`STREAMCONV_META_CACHE_DIR` (optional, a folder): answers are kept there by the config's content and the
transformers version, so a test session or a batch of checkpoints of one model pays for the child once. Nothing
is cached unless it is set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

from .. import failpoints
from ..errors import ReferenceMismatchError

DEFAULT_TIMEOUT_S = 180.0
TIMEOUT_ENV = failpoints.META_TIMEOUT_ENV
CACHE_ENV = failpoints.META_CACHE_ENV
MAX_ANSWER_BYTES = 256 * 1024 * 1024     # a 1T-parameter MoE's per-expert names are ~10 MB of JSON
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "meta_model.py")
# `python -c`: sys.path[0] is '' (the current folder) — dropped, so a stray transformers.py there is not imported.
LAUNCH = "import runpy, sys; del sys.path[0]; runpy.run_path(sys.argv[1], run_name='__main__')"
MARKER = "STREAMCONV-META "

Shape = Tuple[int, ...]


class ProbeFailed(Exception):
    """transformers could not say (kind: no-transformers, unknown-model-type, not-a-transformers-class,
    build-failed, no-layout-loads, timeout, bad-answer). Turned into a ReferenceMismatchError by `expected`."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class MetaAnswer:
    transformers_version: str
    model_class: str
    layouts: Tuple[Tuple[str, Dict[str, Shape]], ...]   # (label, {name: shape}); each loads cleanly
    optional: frozenset                                  # names that may be absent (tied, ignored when missing)
    ignored_extra: Tuple[str, ...]                       # regexes of names transformers ignores when present
    notes: Tuple[str, ...]


def timeout_s(env: Mapping[str, str]) -> float:
    raw = env.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ReferenceMismatchError(f"{TIMEOUT_ENV}={raw[:40]!r}: not a number of seconds") from None
    return value if value > 0 else DEFAULT_TIMEOUT_S


def installed_version() -> Optional[str]:
    """transformers' version from its metadata (no import), None when it is not installed here."""
    import importlib.metadata as md

    try:
        return md.version("transformers")
    except md.PackageNotFoundError:
        return None


def cache_path(env: Mapping[str, str], config_json: str, version: str) -> Optional[str]:
    """Where the answer for `config_json` (as `ask` serialises it) is kept, None when no cache folder is set."""
    folder = env.get(CACHE_ENV)
    if not folder:
        return None
    import hashlib      # here, not at the top: OpenSSL costs ~3.6 MiB of RSS, and only the cache needs it
    key = hashlib.sha256(f"{version}\0{config_json}".encode()).hexdigest()[:32]
    return os.path.join(folder, f"meta-{key}.json")


def _run_child(config_json: str, env: Mapping[str, str]) -> str:
    limit_s = timeout_s(env)
    # This process's environment, not `env` (which carries only settings): offline, quiet, one thread.
    child_env = dict(failpoints.environment(), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                     HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    try:
        done = subprocess.run([sys.executable, "-c", LAUNCH, CHILD], input=config_json, capture_output=True,
                              text=True, timeout=limit_s, env=child_env)
    except subprocess.TimeoutExpired:
        raise ProbeFailed("timeout", f"building the model on the meta device took over {limit_s:g} s "
                                     f"(raise {TIMEOUT_ENV} if this machine is slow)") from None
    except OSError as exc:
        raise ProbeFailed("build-failed", f"cannot start {sys.executable}: {exc}") from None
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith(MARKER)), None)
    if line is None:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        raise ProbeFailed("build-failed", f"the meta-device child exited {done.returncode} without an answer"
                          + (": " + " | ".join(t[:300] for t in tail) if tail else ""))
    return line[len(MARKER):]


def _shape(value, where: str) -> Shape:
    if not isinstance(value, list) or not all(isinstance(d, int) and d >= 0 for d in value):
        raise ProbeFailed("bad-answer", f"{where}: shape {str(value)[:80]} is not a list of sizes")
    return tuple(value)


def parse(text: str) -> MetaAnswer:
    """The child's JSON, checked; ProbeFailed for an error answer or a malformed one."""
    if len(text) > MAX_ANSWER_BYTES:
        raise ProbeFailed("bad-answer", f"answer of {len(text)} bytes is over {MAX_ANSWER_BYTES}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProbeFailed("bad-answer", f"answer is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProbeFailed("bad-answer", "answer is not a JSON object")
    if "error" in data:
        raise ProbeFailed(str(data.get("error"))[:40], str(data.get("message", ""))[:2000])
    try:
        layouts = tuple((str(lay["label"]), {str(n): _shape(s, n) for n, s in lay["weights"].items()})
                        for lay in data["layouts"])
        answer = MetaAnswer(str(data["transformers"]), str(data["model_class"]), layouts,
                            frozenset(str(n) for n in data["optional"]),
                            tuple(str(p) for p in data["ignored_extra"]), tuple(str(n) for n in data["notes"]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProbeFailed("bad-answer", f"answer lacks {exc}") from None
    if not layouts:
        raise ProbeFailed("bad-answer", "answer holds no layout")
    return answer


def ask(config: dict, env: Optional[Mapping[str, str]] = None) -> MetaAnswer:
    """What transformers loads for `config` (a parsed config.json). Raises ProbeFailed when it cannot say."""
    env = failpoints.environment() if env is None else env
    version = installed_version()
    if version is None:
        raise ProbeFailed("no-transformers", "transformers is not installed in this Python environment")
    config_json = json.dumps(config, sort_keys=True)
    cached = cache_path(env, config_json, version)
    if cached and os.path.isfile(cached):
        with open(cached, encoding="utf-8") as f:
            return parse(f.read(MAX_ANSWER_BYTES + 1))
    text = _run_child(config_json, env)
    answer = parse(text)
    if cached:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        partial = f"{cached}.{os.getpid()}.tmp"
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, cached)      # concurrent test workers: each sees a whole answer or none
    return answer
