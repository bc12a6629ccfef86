"""Child process: the weights a config.json's model loads, told by transformers itself on the meta device.

Run only by `meta_probe` in a subprocess (`python -c` + runpy, never imported by the conversion path: it imports
torch and transformers, and building a model class runs that library's code). Reads the config as JSON on stdin,
prints one line `STREAMCONV-META <json>` on stdout:

    {"transformers": "5.25.0", "model_class": "Qwen3ForCausalLM",
     "layouts": [{"label": "...", "weights": {name: [shape...]}}],   # each loads with nothing missing
     "optional": [names of the layouts that may be absent: tied to another weight, or ignored when missing],
     "ignored_extra": [regexes of names transformers ignores when present],
     "notes": [...]}

or `{"error": "<kind>", "message": "..."}`. Kinds: `no-transformers`, `unknown-model-type`, `not-a-transformers-class`,
`build-failed`, `no-layout-loads`.

The layouts are the two a model folder can hold: what `save_pretrained` writes (transformers 5 reverts its load-time
conversions there, e.g. MoE experts as `experts.{e}.gate_proj/up_proj/down_proj`) and the live state dict (e.g. fused
`experts.gate_up_proj`). Each is proven by transformers' own loader (`convert_and_load_state_dict_in_model` on meta
tensors: its renamings and weight converters, then tying and its ignore rules, as `from_pretrained` runs them);
one that would leave a weight missing, unexpected or mis-shaped is not reported.

Only the standard library at module level: the probe reports a missing torch or transformers as an answer.
"""
from __future__ import annotations

import importlib
import json
import re
import sys

MARKER = "STREAMCONV-META "


def _fail(kind: str, message: str) -> dict:
    return {"error": kind, "message": message[:2000]}


def _config(data: dict):
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    transformers.AutoConfig     # (imported by transformers' lazy module on first use: registers every model_type)

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        return None, _fail("unknown-model-type", "config.json names no model_type")
    if model_type not in CONFIG_MAPPING:
        return None, _fail("unknown-model-type", f"model_type {model_type!r} is not one transformers knows")
    body = {k: v for k, v in data.items() if k != "model_type"}
    return CONFIG_MAPPING[model_type].from_dict(body), None


def _model_class(config, data: dict):
    import transformers

    archs = data.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        cls = getattr(transformers, archs[0], None)
        if cls is None or not isinstance(cls, type):
            return None, _fail("not-a-transformers-class",
                               f"architectures names {archs[0]!r}, which is not a transformers class (a model with "
                               "its own code, which streamconv does not run)")
        return cls, None
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            return auto._model_mapping[type(config)], None
        except (KeyError, AttributeError):
            continue
    return None, _fail("not-a-transformers-class", f"no transformers model class for {type(config).__name__}")


def _build(cls, config):
    import torch

    try:
        from transformers.utils import ContextManagers
        contexts = cls.get_init_context(torch.float32, False, False, None, config)    # what from_pretrained uses
    except (ImportError, AttributeError, TypeError):
        contexts = None
    if contexts is None:       # transformers 4: the meta device alone
        with torch.device("meta"):
            return cls(config)
    with ContextManagers(contexts):
        return cls(config)


def _shapes(state: dict) -> dict:
    return {k: [int(d) for d in v.shape] for k, v in state.items()}


def _tied(model) -> set:
    keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(keys, dict):
        return set(keys)
    # transformers 4: a list of names, tied only when the config says so
    if getattr(model.config, "tie_word_embeddings", False):
        return set(getattr(model, "_tied_weights_keys", None) or ())
    return set()


def _loads_cleanly(model, layout: dict) -> str:
    """'' when transformers' loader takes `layout` (name -> meta tensor) with nothing missing, unexpected,
    mis-shaped or failing to convert; else what went wrong."""
    import torch
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    state = {k: torch.empty(v, device="meta") for k, v in layout.items()}
    load_config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model, None, None),
                                      device_map={"": "meta"}, dtype=torch.float32)
    info, _ = convert_and_load_state_dict_in_model(model, state, load_config)
    model.tie_weights(missing_keys=info.missing_keys, recompute_mapping=False)
    model._adjust_missing_and_unexpected_keys(info)
    problems = [f"{what}: {sorted(map(str, found))[:5]}" for what, found in (
        ("missing", info.missing_keys), ("unexpected", info.unexpected_keys),
        ("mismatched", info.mismatched_keys), ("conversion errors", list(info.conversion_errors)))
        if found]
    return "; ".join(problems)


def _layouts(model, fresh, tied: set) -> tuple:
    """[(label, {name: shape})] that load cleanly, and notes on any that do not. `fresh()` builds another meta
    model: each simulated load gets its own (loading replaces parameters and ties weights in place)."""
    live = _shapes(model.state_dict())
    candidates = []
    try:
        from transformers.core_model_loading import revert_weight_conversion
        saved = _shapes(revert_weight_conversion(model, model.state_dict()))
        saved.update({k: live[k] for k in tied if k in live})     # save_pretrained drops them; a file may hold them
        candidates.append(("as save_pretrained writes it", saved))
    except ImportError:
        pass
    if not candidates or candidates[0][1] != live:
        candidates.append(("as the model holds it in memory", live))
    try:
        loading = importlib.import_module("transformers.core_model_loading")
    except ImportError:
        loading = None
    if not hasattr(loading, "convert_and_load_state_dict_in_model"):   # transformers 4: the state dict's names
        return candidates, ["loader not simulated (transformers before 5): names are the model's state dict"]
    kept, notes = [], []
    for label, layout in candidates:
        problem = _loads_cleanly(fresh(), {k: v for k, v in layout.items() if k not in tied})
        if problem:
            notes.append(f"the names {label} do not load cleanly: {problem}")
        else:
            kept.append((label, layout))
    return kept, notes


def describe(data: dict) -> dict:
    """The answer for one config.json (already parsed). Errors are answers, not exceptions."""
    try:
        importlib.import_module("torch")     # transformers' models need it: without it there is no answer
        import transformers
    except ImportError as exc:
        return _fail("no-transformers", f"{exc}")
    try:
        transformers.utils.logging.disable_progress_bar()     # "Loading weights" bars, once per simulated load
    except AttributeError:
        pass
    try:
        config, error = _config(data)
        if error:
            return error
        cls, error = _model_class(config, data)
        if error:
            return error
        model = _build(cls, config)
    except Exception as exc:        # the library's own code on an untrusted config: any failure is an answer
        return _fail("build-failed", f"{type(exc).__name__}: {exc}")
    tied = _tied(model)
    ignore_missing = [str(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or ())]
    live_names = model.state_dict().keys()
    optional = sorted(tied | {k for k in live_names for p in ignore_missing if re.search(p, k)})
    try:
        layouts, notes = _layouts(model, lambda: _build(cls, config), tied)
    except Exception as exc:
        return _fail("build-failed", f"simulating the load: {type(exc).__name__}: {exc}")
    if not layouts:
        return _fail("no-layout-loads", "; ".join(notes))
    extra = [str(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    buffers = {name for name, _ in model.named_buffers()}
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        extra.append(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        extra.append(r"(^|\.)position_ids$")
    return {"transformers": transformers.__version__, "model_class": cls.__name__,
            "layouts": [{"label": label, "weights": layout} for label, layout in layouts],
            "optional": optional, "ignored_extra": extra, "notes": notes}


def main() -> int:
    try:
        data = json.loads(sys.stdin.read())
    except ValueError as exc:
        answer = _fail("build-failed", f"config is not JSON: {exc}")
    else:
        answer = describe(data) if isinstance(data, dict) else _fail("build-failed", "config is not a JSON object")
    sys.stdout.write(MARKER + json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
