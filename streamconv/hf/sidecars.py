"""The files beside the weights that make a folder loadable: config, generation config, tokenizer, processor.

Where they come from: `--config-from DIR`, or else the `model_name` in llama-recipes' `train_params.yaml` when
it names a local folder or a model in the local Hugging Face cache. No network, no yaml dependency.
"""
from __future__ import annotations

import fnmatch
import json
import os
import stat
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import OptionsError, OutputError
from ..fs import location, objects
from ..output.upload import PartBudget, UploadSink
from ..fs.infiles import open_regular
from ..fs.remote import is_url
from ..fs.outfiles import create_new

CONFIG_FILE = "config.json"
# Copied byte for byte when present. config.json is rewritten (its dtype field follows the output).
SIDECAR_FILES: Tuple[str, ...] = (
    "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt",          # BPE tokenizers (GPT-2, Qwen) keep these too
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
)
SIDECAR_GLOBS: Tuple[str, ...] = ("chat_template.*",)
TOKENIZER_FILES: Tuple[str, ...] = ("tokenizer.json", "tokenizer.model", "vocab.json")
TRAIN_PARAMS_FILE = "train_params.yaml"
# config.json keys naming the weights' dtype: transformers >= 4.56 writes `dtype`, older ones `torch_dtype`.
DTYPE_KEYS: Tuple[str, ...] = ("dtype", "torch_dtype")
# config.json is a few KB; one past this is not a config (and is not read whole).
MAX_CONFIG_BYTES = 64 * 2**20
COPY_STEP_BYTES = 8 * 2**20


@dataclass(frozen=True)
class HFConfig:
    """A model folder's config.json, read as plain JSON."""

    folder: str
    data: dict

    @property
    def model_type(self) -> Optional[str]:
        return self.data.get("model_type")

    @property
    def dtype(self) -> Optional[str]:
        """The weights' dtype the config declares ("bfloat16"), if any."""
        for key in DTYPE_KEYS:
            value = self.data.get(key)
            if isinstance(value, str) and value:
                return value[len("torch."):] if value.startswith("torch.") else value
        return None

    @property
    def tie_word_embeddings(self) -> Optional[bool]:
        """True/False when the config says so (top level, else its text config); None when it is silent."""
        for scope in (self.data, self.data.get("text_config") or {}):
            value = scope.get("tie_word_embeddings")
            if isinstance(value, bool):
                return value
        return None


def load_config(folder: str) -> HFConfig:
    """`folder`'s config.json. A hub cache repo folder (`models--org--name/`) stands for its `main` snapshot.
    Without config.json the error says what the folder is instead (a training checkpoint, say) and where a
    config.json is nearby."""
    if not location.at(folder).is_dir():
        raise OptionsError(f"--config-from {folder}: not a folder; pass a Hugging Face model folder "
                           "(with config.json), e.g. the base model's hub snapshot")
    if is_url(folder):
        return HFConfig(folder=folder, data=_remote_config(folder))
    snapshot = _hub_snapshot(folder)
    if snapshot is not None:
        folder = snapshot
    path = os.path.join(folder, CONFIG_FILE)
    try:
        with os.fdopen(open_regular(path, error=OptionsError), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_CONFIG_BYTES:
                raise OptionsError(f"{path}: {size:,} bytes is not a config.json (those are a few KB)")
            data = json.loads(f.read(size))
    except FileNotFoundError:
        raise OptionsError(_no_config_message(folder)) from None
    except (OSError, ValueError) as exc:
        raise OptionsError(f"{path}: cannot read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return HFConfig(folder=os.path.abspath(folder), data=data)


def _remote_config(folder: str) -> dict:
    """config.json of a model folder in object storage (no hub-cache layout there)."""
    where = location.at(folder)
    path = where.join(CONFIG_FILE)
    entry = where.entry(CONFIG_FILE)
    if entry is None or entry.kind != location.FILE:
        raise OptionsError(f"--config-from {folder}: no config.json there; pass the folder holding the base "
                           "model's config.json (a save_pretrained folder)")
    if entry.size > MAX_CONFIG_BYTES:
        raise OptionsError(f"{path}: {entry.size:,} bytes is not a config.json (those are a few KB)")
    try:
        data = json.loads(where.read_small(CONFIG_FILE, entry.size))
    except ValueError as exc:
        raise OptionsError(f"{path}: cannot read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# What a training run leaves in its checkpoint folders (accelerate, transformers Trainer, torchtitan, DCP itself).
TRAINING_MARKERS: Tuple[str, ...] = (".metadata", "__0.metadata", "trainer_state.json", "training_args.bin",
                                     "optimizer_0", "pytorch_model_fsdp_0", "scheduler.pt", "scheduler.bin",
                                     "random_states_0.pkl", "train_state")
PARENT_LEVELS = 3   # how far up to look for a config.json beside a training checkpoint


def _no_config_message(folder: str) -> str:
    folder = os.path.abspath(folder)
    try:
        present = set(os.listdir(folder))
    except OSError:
        present = set()
    markers = [m for m in TRAINING_MARKERS if m in present]
    markers += sorted(n for n in present if n.startswith(("checkpoint-", "step-"))
                      and os.path.isdir(os.path.join(folder, n)))[:3]
    lines = [f"--config-from {folder}: no config.json there."]
    if markers:
        lines.append(f"It is a training checkpoint (it holds {', '.join(markers)}), not a model folder: --config-from "
                     "needs the base model you fine-tuned from, a folder with its config.json, tokenizer and weights "
                     "(a save_pretrained folder, or the hub snapshot "
                     "~/.cache/huggingface/hub/models--ORG--NAME/snapshots/HASH).")
    else:
        lines.append("Pass the folder holding the base model's config.json (a save_pretrained folder or hub snapshot).")
    parent = folder
    for _ in range(PARENT_LEVELS):
        parent = os.path.dirname(parent)
        if os.path.isfile(os.path.join(parent, CONFIG_FILE)):
            lines.append(f"{os.path.join(parent, CONFIG_FILE)} exists in a folder above: if that is the base "
                         f"model's, pass --config-from {parent}.")
            break
    return "\n".join(lines)


def _hub_snapshot(folder: str) -> Optional[str]:
    """The snapshot a hub cache repo folder (`models--org--name/`, holding `snapshots/` and `refs/`) stands for:
    the `main` ref's, else the newest holding a config.json. None for any other folder."""
    snapshots = os.path.join(folder, "snapshots")
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)) or not os.path.isdir(snapshots):
        return None
    try:
        with open(os.path.join(folder, "refs", "main"), encoding="utf-8") as f:
            main = os.path.join(snapshots, f.read().strip())
        if os.path.isfile(os.path.join(main, CONFIG_FILE)):
            return main
    except OSError:
        pass
    candidates = [os.path.join(snapshots, s) for s in os.listdir(snapshots)]
    candidates = [c for c in candidates if os.path.isfile(os.path.join(c, CONFIG_FILE))]
    return max(candidates, key=os.path.getmtime) if candidates else None


def sidecar_names(folder: str) -> List[str]:
    """The sidecar files present in `folder` (config.json first), in a stable order.

    Each must be a regular file (or a symlink to one, as in hub snapshots): a FIFO, a device or a directory
    under a sidecar's name is refused here, before any conversion work, by name.
    """
    where = location.at(folder)
    present = set(where.names())
    found = [n for n in (CONFIG_FILE,) + SIDECAR_FILES if n in present]
    found += sorted(n for n in present if any(fnmatch.fnmatchcase(n, g) for g in SIDECAR_GLOBS))
    if is_url(folder):      # objects: always regular
        return [n for n in found if (where.entry(n) or location.Entry(location.OTHER, 0, ())).kind == location.FILE]
    for name in found:
        path = os.path.join(folder, name)
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise OptionsError(f"{path}: cannot read: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            os.close(open_regular(path, error=OptionsError))     # raises, naming what the file is
    return found


def patched_config(data: dict, dtype: str, *, transformers_version: Optional[str] = None) -> dict:
    """A copy of config `data` whose dtype field(s) say `dtype`.

    Every dtype key already present is set (top level and nested sub-configs such as `text_config`), so
    old and new transformers read the same value. A config naming none gets the key its transformers
    version reads: `dtype` from 4.56 on, `torch_dtype` before.
    """
    def patch(d: dict) -> bool:
        hit = False
        for key in DTYPE_KEYS:
            if key in d:
                d[key] = dtype
                hit = True
        for value in d.values():
            if isinstance(value, dict) and "model_type" in value:   # a sub-config, not a plain mapping
                patch(value)
        return hit

    out = json.loads(json.dumps(data))
    if not patch(out):
        version = transformers_version or out.get("transformers_version") or ""
        out["torch_dtype" if _version_tuple(version) and _version_tuple(version) < (4, 56) else "dtype"] = dtype
    return out


def _version_tuple(text: str) -> Tuple[int, ...]:
    parts = []
    for piece in str(text).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def copy_sidecars(config: HFConfig, names: Sequence[str], dest: str, dtype: Optional[str]) -> List[str]:
    """Copy `names` (from `sidecar_names`: config, generation config, tokenizer and processor files) from
    `config.folder` into `dest`.

    Symlinks (hub snapshots point into blobs/) are followed: the output holds real files. Returns the names
    written, config.json first.
    """
    written = []
    for name in names:
        src, dst = location.at(config.folder).join(name), location.at(dest).join(name)
        try:
            if name == CONFIG_FILE:
                data = patched_config(config.data, dtype) if dtype else config.data
                text = (json.dumps(data, indent=2) + "\n").encode("utf-8")
                if is_url(dst):     # an output in a bucket: one PUT into its staging prefix
                    objects.put(dst, text)
                else:
                    with os.fdopen(create_new(dst), "wb") as f:
                        f.write(text)
            elif is_url(src):
                _copy_object(config.folder, name, dst)
            else:
                copy_regular(src, dst)
        except OSError as exc:
            raise OutputError(f"copying {src} into the output: {exc.strerror}") from None
        written.append(name)
    return written


def copy_regular(src: str, dst: str) -> int:
    """Copy regular file `src` to `dst`, exactly the size fstat gave when it was opened. Returns the bytes copied.

    A sidecar that is a FIFO or a device (a `tokenizer.json` symlinked to /dev/zero) is refused instead of
    copied until the disk is full; a file that grows while copied stops at its size; one that shrinks fails.
    """
    src_fd = open_regular(src, error=OptionsError)
    try:
        size = os.fstat(src_fd).st_size
        _copy_blocks(lambda offset, n: os.pread(src_fd, n, offset), size, dst, f"{src}: file")
    finally:
        os.close(src_fd)
    return size


def _copy_object(folder: str, name: str, dst: str) -> int:
    """Copy object `name` of `folder` (a URL) to the new file `dst`, in COPY_STEP_BYTES ranges."""
    where = location.at(folder)
    entry = where.entry(name)
    if entry is None:
        raise OptionsError(f"{where.join(name)}: disappeared before it was copied into the output")
    _copy_blocks(lambda offset, n: where.read(name, offset, n), entry.size, dst, f"{where.join(name)}: object")
    return entry.size


def _copy_blocks(read_at, size: int, dst: str, what: str) -> None:
    """Write `size` bytes, read in COPY_STEP_BYTES steps by `read_at(offset, n)`, to the new file `dst` (never
    through a symlink planted in the staging folder) or object `dst` (a multipart upload of parts filled in
    order, so one part buffer at a time); a source that ends early fails, naming `what`."""
    if is_url(dst):
        sink = UploadSink(dst, size, PartBudget(2))
        try:
            _copy_steps(read_at, size, sink.write_at, what)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        return
    dst_fd = create_new(dst)

    def write_at(_offset: int, block: bytes) -> None:   # the file is written front to back
        view = memoryview(block)
        while view:
            view = view[os.write(dst_fd, view):]

    try:
        _copy_steps(read_at, size, write_at, what)
    finally:
        os.close(dst_fd)


def _copy_steps(read_at, size: int, write_at, what: str) -> None:
    """Pass `size` bytes from `read_at(offset, n)` to `write_at(offset, block)` in order, COPY_STEP_BYTES at a
    time; a source that ends early fails, naming `what`."""
    done = 0
    while done < size:
        block = read_at(done, min(COPY_STEP_BYTES, size - done))
        if not block:
            raise OptionsError(f"{what} shrank from {size} to {done} bytes while being copied")
        write_at(done, block)
        done += len(block)


# -- finding the base model without --config-from ---------------------------------------------------------


def read_train_params(path: str) -> Dict[str, str]:
    """`key: value` pairs of llama-recipes' train_params.yaml (flat, every value a string).

    Just enough YAML for that file: top-level scalars, '#' comments, single- or double-quoted values, and
    indented continuation lines of a long plain value. Nested mappings and lists are skipped.
    """
    if is_url(path):
        folder, name = location.parent_and_name(path)
        lines = location.at(folder).read_small(name, MAX_CONFIG_BYTES).decode("utf-8").splitlines(keepends=True)
        return _parse_train_params(lines)
    with open(path, encoding="utf-8") as f:
        return _parse_train_params(f)


def _parse_train_params(lines) -> Dict[str, str]:
    params: Dict[str, str] = {}
    last: Optional[str] = None
    for raw in lines:
        line = raw.rstrip("\n")
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped in ("---", "..."):
            continue
        if line[:1] in (" ", "\t"):
            if last is not None and params.get(last):
                params[last] += " " + stripped     # folded continuation of a plain scalar
            continue
        key, sep, value = line.partition(":")
        if not sep:
            last = None
            continue
        last = key.strip()
        params[last] = _scalar(value.strip())
    return params


def _scalar(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text[1:-1]
    if " #" in text:
        text = text.split(" #", 1)[0].rstrip()
    return text


def hub_cache_dirs(env: Mapping[str, str]) -> List[str]:
    """Where huggingface_hub keeps downloads, in its own order of precedence."""
    dirs = []
    if env.get("HF_HUB_CACHE"):
        dirs.append(env["HF_HUB_CACHE"])
    if env.get("HF_HOME"):
        dirs.append(os.path.join(env["HF_HOME"], "hub"))
    if env.get("TRANSFORMERS_CACHE"):
        dirs.append(env["TRANSFORMERS_CACHE"])
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    dirs.append(os.path.join(xdg, "huggingface", "hub"))
    return list(dict.fromkeys(os.path.expanduser(d) for d in dirs))


def find_in_hub_cache(repo_id: str, env: Mapping[str, str]) -> Optional[str]:
    """The snapshot folder of `org/name` in a local HF cache (the `main` ref, else the newest with a config)."""
    if repo_id.count("/") != 1:
        return None
    entry = "models--" + repo_id.replace("/", "--")
    for cache in hub_cache_dirs(env):
        snapshot = _hub_snapshot(os.path.join(cache, entry))
        if snapshot is not None:
            return snapshot
    return None


@dataclass(frozen=True)
class ConfigSource:
    folder: Optional[str]   # None: no config found
    note: str               # what was found or what to do, for the report


def find_config_dir(checkpoint_dir: str, config_from: Optional[str], env: Mapping[str, str], *,
                    no_config: bool = False) -> ConfigSource:
    """`--config-from` when given; else train_params.yaml's model_name if it resolves offline; else None.
    `no_config` (--no-config): never look beyond --config-from, so the output does not depend on what happens
    to be in the user's folders or HF cache."""
    if config_from and no_config:
        raise OptionsError("--no-config and --config-from contradict each other; give one of them")
    if config_from:
        folder = location.absolute(config_from)
        return ConfigSource(folder, f"config and tokenizer from {folder}")
    if no_config:
        return ConfigSource(None, f"--no-config: weights only, no config.json or tokenizer written "
                                  f"({TRAIN_PARAMS_FILE} and the Hugging Face cache not consulted)")
    how_to = ("to make the folder loadable by transformers, re-run with --config-from DIR (the base model's "
              "folder or hub snapshot, holding config.json and the tokenizer)")
    where = location.at(checkpoint_dir)
    params_path = where.join(TRAIN_PARAMS_FILE)
    if not _is_file(where, TRAIN_PARAMS_FILE):
        return ConfigSource(None, f"no config.json written: {how_to}")
    try:
        model_name = read_train_params(params_path).get("model_name", "").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return ConfigSource(None, f"{params_path}: cannot read ({exc}); no config.json written: {how_to}")
    if not model_name or model_name == "None":
        return ConfigSource(None, f"{TRAIN_PARAMS_FILE} names no model_name; no config.json written: {how_to}")
    for candidate in (model_name, where.join(model_name)):
        candidate = candidate if is_url(candidate) else os.path.expanduser(candidate)
        if _is_file(location.at(candidate), CONFIG_FILE):
            folder = location.absolute(candidate)
            return ConfigSource(folder, f"config and tokenizer from {folder} (model_name in {TRAIN_PARAMS_FILE})")
    snapshot = find_in_hub_cache(model_name, env)
    if snapshot:
        return ConfigSource(snapshot, f"config and tokenizer from the local Hugging Face cache: {snapshot} "
                                      f"(model_name {model_name!r} in {TRAIN_PARAMS_FILE})")
    return ConfigSource(None, f"{TRAIN_PARAMS_FILE} names model {model_name!r}, which is neither a local folder nor "
                              f"in the local Hugging Face cache; no config.json written: {how_to}")


def missing_tokenizer_note(names: Sequence[str], folder: str) -> Optional[str]:
    if any(n in names for n in TOKENIZER_FILES):
        return None
    return (f"no tokenizer files in {folder}; copy tokenizer.json / tokenizer_config.json from the base model "
            "into the output to use it with pipelines or vLLM")


def _is_file(where, name: str) -> bool:
    try:
        entry = where.entry(name)
    except OSError:
        return False
    return entry is not None and entry.kind == location.FILE
