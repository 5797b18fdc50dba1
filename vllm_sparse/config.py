# SPDX-License-Identifier: Apache-2.0
"""The one configuration schema, the per-model files, and the overrides.

Where a value comes from, lowest to highest priority:
1. the defaults below (the papers' values where they apply);
2. the per-model YAML file in `configs/` whose `match` section names the model
   (`--model`, `--served-model-name` or `_name_or_path`, compared by full name or last
   path component, case-insensitively) or, for a local directory, whose fingerprint
   (architecture, layers, hidden size, heads, KV heads) equals the model's;
3. `--additional-config '{"vllm_sparse": {...}}'` (`LLM(additional_config=...)`).

The method is the one named by `--attention-backend`; with `CUSTOM` it is the config's
`method`. An explicit `method` in `--additional-config` that disagrees with the backend
name is an error. One start-up log line states the method, its hyperparameters and
where each came from.
"""

import functools
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat,
                      PositiveInt, StrictFloat, StrictInt, ValidationError, field_validator)

logger = logging.getLogger("vllm.vllm_sparse")  # inherits vLLM's log handlers

METHODS = ("radar", "recycled", "nats", "sparsek")
IMPLEMENTED_METHODS = ("radar", "recycled", "nats", "sparsek")
Method = Literal["radar", "recycled", "nats", "sparsek"]
LayerMethod = Literal["radar", "recycled", "nats", "sparsek", "dense"]
Budget = Union[StrictInt, StrictFloat]
Kernels = Literal["auto", "triton", "torch", "numba"]
KERNEL_CHOICES = get_args(Kernels)


def _check_budget(value: Budget | None) -> Budget | None:
    if value is None:
        return value
    if isinstance(value, int) and value < 1:
        raise ValueError(f"budget={value!r}: a token count must be >= 1")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(
            f"budget={value!r}: a fraction of the context must be in (0, 1]; "
            "give a token count as an integer")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RadarConfig(_Strict):
    """Radar (Hao et al., ICLR 2025, https://openreview.net/forum?id=1Uh1QDYz6n).

    Parameters
    ----------
    projection_dim : int, default 128
        Random features per sign (n); each page summary holds 2n floats per KV head.
        The paper uses 16 * head_dim; 128 keeps summaries at 1/8 of a 32-token fp32 page.
    aspect_ratio : float, default 2.0
        Segments hold about sqrt(T_ref) / aspect_ratio tokens (rounded to whole KV
        blocks, at least one), T_ref being the context rounded down to a power of two.
    num_sink_tokens : int, default 1
        First tokens always attended.
    local_window : int, default 64
        Most recent tokens always attended (the current token included).
    seed : int, default 0
        Seed of the projection; the same on every TP rank and every run.
    center_keys : bool, default True
        Summarise each page as its mean key mu plus random features of k - mu, and score
        q.mu * scale + log(phi(q) . sum phi(k - mu)): the same expectation, far lower
        variance (on SmolLM2 at a 25% budget, perplexity 1.08x dense instead of 1.27x).
        False is the paper's estimator.
    """

    projection_dim: PositiveInt = 128
    aspect_ratio: PositiveFloat = 2.0
    num_sink_tokens: NonNegativeInt = 1
    local_window: NonNegativeInt = 64
    seed: int = 0
    center_keys: bool = True


class RecycledConfig(_Strict):
    """Recycled Attention / RefreshKV (Xu, Goyal, Choi; arXiv 2411.05787, ACL 2025).

    Prefill is dense; the last prompt token's attention, max-pooled over positions and
    maximised over the query heads of each KV head, ranks the context, and its top K
    (K = the budget) are recycled. A partial step attends to the best K - g recycled
    tokens plus the g tokens generated since the last full step (the paper's partial
    cache: each new token pushes out the lowest-ranked recycled one). A full step
    attends to everything and refreshes the ranking.

    Parameters
    ----------
    schedule : "dynamic" | "fixed", default "dynamic"
        fixed: a full step every `stride` decode steps. dynamic (the paper's default):
        every `check_every` steps, a KV head whose mean query (over its query heads) has
        cosine similarity below `similarity_threshold` with the one of its last full
        step does a full step. Decisions are per layer and KV head (the paper decides
        per layer from all query heads), so each tensor-parallel rank decides alone.
    stride : int, default 16
        S of the fixed schedule; 1 is dense attention.
    check_every : int, default 5
        QC of the dynamic schedule (the paper uses 5 or 10).
    similarity_threshold : float, default 0.85
        s of the dynamic schedule (paper: 0.85 for Llama-3.1-8B, 0.95 for Qwen2-7B).
    pool_width : int, default 7
        Width of the max-pool over positions applied to the attention before ranking
        (odd; 1 disables it).
    """

    schedule: Literal["dynamic", "fixed"] = "dynamic"
    stride: PositiveInt = 16
    check_every: PositiveInt = 5
    similarity_threshold: float = Field(default=0.85, ge=-1.0, le=1.0)
    pool_width: PositiveInt = 7

    @field_validator("pool_width")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"pool_width={value}: must be odd (1, 3, 5, 7, ...)")
        return value


def _weights_path(value: str | None, method: str, key: str, missing: str) -> Path:
    """A method's trained-weights file `method.key`, resolved (relative paths are relative
    to `configs/`); an error naming the key when it is not set."""
    if value is None:
        raise ValueError(
            f"vllm_sparse: {method} needs {missing}; set {method}.{key} (a safetensors path, "
            "absolute or relative to configs/) in the model's configs/*.yaml or in "
            f"--additional-config '{{\"vllm_sparse\": {{\"{method}\": {{\"{key}\": PATH}}}}}}'")
    path = Path(value).expanduser()
    return path if path.is_absolute() else config_dir() / path


class NatsConfig(_Strict):
    """NAtS (Deng, Lindauer; arXiv 2502.13251): learned per-chunk token types, KV eviction.

    Based on https://arxiv.org/abs/2502.13251. The gates file (`vllm_sparse.nats.gates`
    format) is the one source of truth for the chunk size and the SLIDING window; the
    budget is not used (the gates decide what is kept).

    Parameters
    ----------
    gates : str, required with --attention-backend nats
        Path of the model's gates (safetensors), absolute or relative to `configs/`.
    chunk_size : int, optional
        Only a check: must equal the gates file's chunk size.
    window : int, optional
        Only a check: must equal the gates file's window.
    """

    gates: str | None = None
    chunk_size: PositiveInt | None = None
    window: NonNegativeInt | None = None

    def gates_path(self) -> Path:
        """The gates file, resolved (relative paths are relative to `configs/`)."""
        return _weights_path(self.gates, "nats", "gates", "gates trained for the model and "
                             "none are configured")


class SparseKConfig(_Strict):
    """SparseK (Lou et al.; arXiv 2406.16747): a learned per-token score, the top-k older
    tokens plus a sliding window per KV head, values scaled by SPARSEK's p; KV eviction.

    Based on https://arxiv.org/abs/2406.16747. The scorer file (`vllm_sparse.sparsek.scorer`
    format) holds the weights and a window; k = budget - window, so the budget (an integer
    token count: SparseK keeps a constant number of tokens) counts the window too.

    Parameters
    ----------
    scorer : str, required with --attention-backend sparsek
        Path of the model's scorer (safetensors), absolute or relative to `configs/`.
    window : int or float, optional
        The always-attended recent window W, in place of the scorer file's (the score does
        not depend on W; the file's W is the one it was fitted or trained with): a token
        count (int >= 0), or a fraction of the budget (float in (0, 1), W = int(f * budget)).
        A larger window keeps more of the recent context at the same budget: on
        SmolLM2-135M at 4K, W = budget / 2 cut the perplexity gap to dense from 19% (W = 64)
        to 3% (see configs/sparsek/README.md). k = budget - W must be >= 1.
    """

    scorer: str | None = None
    window: Union[StrictInt, StrictFloat, None] = None

    @field_validator("window")
    @classmethod
    def _window(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError(f"window={value!r}: a token count must be >= 0")
        if isinstance(value, float) and not 0.0 < value < 1.0:
            raise ValueError(f"window={value!r}: a fraction of the budget must be in (0, 1); "
                             "give a token count as an integer")
        return value

    def window_tokens(self, budget: int, file_window: int) -> int:
        """W for an integer budget: the configured count or fraction, else the file's."""
        if self.window is None:
            return file_window
        return int(self.window * budget) if isinstance(self.window, float) else self.window

    def scorer_path(self) -> Path:
        """The scorer file, resolved (relative paths are relative to `configs/`)."""
        return _weights_path(self.scorer, "sparsek", "scorer", "a scorer trained for the model "
                             "and none is configured")


class LayerOverride(_Strict):
    """Per-layer changes, e.g. `{"0": {"method": "dense"}}`."""

    method: LayerMethod | None = None
    budget: Budget | None = None

    _budget = field_validator("budget")(classmethod(lambda cls, v: _check_budget(v)))


class SparseConfig(_Strict):
    """Every method's hyperparameters, validated in one place.

    `budget` is the number of distinct KV tokens each query attends per KV head, sinks
    and local window included: an integer token count, or a float in (0, 1] taken as a
    fraction of the request's current context. A budget at least as large as the
    context attends everything.

    `eval_sparse_prefill_from` (evaluation only): when set to P, prefill queries at
    positions >= P attend exactly as a decode step would, so prompt log-probs measure
    the sparse policy.

    `kernels`: the mechanism; `auto` is Triton on CUDA, Numba on a CPU with a float32 KV
    cache and torch otherwise; `triton` on a CPU needs TRITON_INTERPRET=1 (tests), `numba`
    needs the CPU and float32, `torch` is the fallback everywhere.
    """

    method: Method = "radar"
    budget: Budget = 2048
    radar: RadarConfig = RadarConfig()
    recycled: RecycledConfig = RecycledConfig()
    nats: NatsConfig = NatsConfig()
    sparsek: SparseKConfig = SparseKConfig()
    layers: dict[int, LayerOverride] = Field(default_factory=dict)
    eval_sparse_prefill_from: NonNegativeInt | None = None
    kernels: Kernels = "auto"

    _budget = field_validator("budget")(classmethod(lambda cls, v: _check_budget(v)))

    def for_layer(self, index: int | None) -> tuple[str, Budget]:
        """(method, budget) of one layer after its override."""
        override = self.layers.get(index) if index is not None else None
        method = (override and override.method) or self.method
        budget = override.budget if override and override.budget is not None else self.budget
        return method, budget


class ModelMatch(_Strict):
    names: list[str] = Field(default_factory=list)
    fingerprint: dict[str, Any] = Field(default_factory=dict)


class ModelConfigFile(SparseConfig):
    """A file in `configs/`: a `match` section plus any `SparseConfig` field."""

    match: ModelMatch


# ---------------------------------------------------------------- errors
def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif part == "layers" or isinstance(part, int):
            model = LayerOverride
    return sorted(model.model_fields)


def _validate(model: type[BaseModel], data: dict, source: str):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = err["loc"]
            if len(loc) >= 2 and loc[-2] == "budget" and loc[-1] in ("int", "float"):
                loc = loc[:-1]      # a non-numeric budget fails both branches of the union
                err = dict(err, loc=loc, type="budget_type",
                           msg="must be an integer token count >= 1 or a fraction of the "
                               "context in (0, 1]")
            key = ".".join(str(p) for p in loc)
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; allowed keys: {', '.join(_allowed_keys(model, err['loc']))}"
            elif err["loc"] and err["loc"][-1] in ("method", "budget") and "input" in err:
                msg = f"{msg} (got {err['input']!r})"
            if f"  {key}: {msg}" not in lines:
                lines.append(f"  {key}: {msg}")
        raise ValueError(f"vllm_sparse: invalid configuration in {source}:\n" + "\n".join(lines)) from None


# ---------------------------------------------------------------- model files
def config_dir() -> Path:
    return Path(str(resources.files("vllm_sparse.configs")))


@functools.cache
def load_model_files() -> dict[str, ModelConfigFile]:
    """Every per-model file, validated (a malformed file fails here, naming itself)."""
    files = {}
    for path in sorted(config_dir().glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ValueError(f"vllm_sparse: {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"vllm_sparse: {path} must hold a mapping, got {type(data).__name__}")
        files[path.name] = _validate(ModelConfigFile, data, str(path))
    return files


def model_fingerprint(hf_config) -> dict[str, Any]:
    text = getattr(hf_config, "get_text_config", lambda: hf_config)()
    return {
        "architecture": (getattr(hf_config, "architectures", None) or [None])[0],
        "num_hidden_layers": getattr(text, "num_hidden_layers", None),
        "hidden_size": getattr(text, "hidden_size", None),
        "num_attention_heads": getattr(text, "num_attention_heads", None),
        "num_key_value_heads": getattr(text, "num_key_value_heads", None),
    }


def _name_keys(name: str) -> set[str]:
    name = name.rstrip("/").lower()
    return {name, name.rsplit("/", 1)[-1]}


def find_model_file(names: list[str], fingerprint: dict) -> tuple[str, ModelConfigFile] | None:
    wanted = set().union(*(_name_keys(n) for n in names if n))
    files = load_model_files()
    for file_name, spec in files.items():
        if wanted & set().union(*(_name_keys(n) for n in spec.match.names)):
            return file_name, spec
    for file_name, spec in files.items():
        fp = spec.match.fingerprint
        if fp and all(fingerprint.get(k) == v for k, v in fp.items()):
            return file_name, spec
    return None


# ---------------------------------------------------------------- resolution
def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaves(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        out.update(_leaves(value, path + ".") if isinstance(value, dict) and value else {path: value})
    return out


def resolve(names: list[str], fingerprint: dict, override: Any,
            backend_method: str | None) -> tuple[SparseConfig, str]:
    """Build the effective config; returns it with a one-line description of its sources.

    `backend_method` is the method named by the attention backend (None for CUSTOM).
    """
    if override is None:
        override = {}
    if not isinstance(override, dict):
        raise ValueError("vllm_sparse: --additional-config 'vllm_sparse' must be a JSON "
                         f"object, got {type(override).__name__}: {override!r}")
    _validate(SparseConfig, override, "--additional-config vllm_sparse")
    found = find_model_file(names, fingerprint)
    file_name, file_data = None, {}
    if found:
        file_name = found[0]
        file_data = found[1].model_dump(exclude={"match"}, exclude_unset=True)
    if backend_method and "method" in override and override["method"] != backend_method:
        raise ValueError(
            f"vllm_sparse: --attention-backend {backend_method} disagrees with "
            f"method={override['method']!r} in --additional-config; make them agree, or use "
            "--attention-backend custom to take the method from the config")
    merged = _deep_merge(file_data, override)
    if backend_method:
        merged["method"] = backend_method
    config = _validate(SparseConfig, merged, "the merged configuration")
    method, _ = config.for_layer(None)
    used = {method} | {m for m, _ in (config.for_layer(i) for i in config.layers)}
    missing = sorted(used - set(IMPLEMENTED_METHODS) - {"dense"})
    if missing:
        raise NotImplementedError(
            f"vllm_sparse: method {', '.join(missing)} is not implemented yet; "
            f"implemented: {', '.join(IMPLEMENTED_METHODS)}. Refusing to fall back to dense.")
    if "nats" in used:
        _check_nats(config, file_name, file_data, override)
    if "sparsek" in used:
        _check_sparsek(config)
    return config, _describe(config, file_name, file_data, override, backend_method)


def _check_trained(config: SparseConfig, method: str, key: str, what: str, path: Path) -> None:
    """An evicting method with trained weights: no per-layer methods (every layer evicts with
    its own weights), and the weights file `method.key` present."""
    if config.layers:
        raise NotImplementedError(
            f"vllm_sparse: per-layer overrides (layers) are not supported with {method}: every "
            f"layer evicts with its own trained {what} (got layers={sorted(config.layers)}); "
            "remove them")
    if not path.is_file():
        value = getattr(getattr(config, method), key)
        raise FileNotFoundError(f"vllm_sparse: {method} {what} file {path} ({method}.{key}="
                                f"{value!r}) does not exist; train {what} for this model "
                                f"(python -m vllm_sparse.train {method}) or fix the path")


def _check_nats(config: SparseConfig, file_name, file_data: dict, override: dict) -> None:
    """NAtS at start-up: gates configured and present, no per-layer methods, budget unused."""
    _check_trained(config, "nats", "gates", "gates", config.nats.gates_path())
    if "budget" in override or "budget" in file_data:
        source = "--additional-config" if "budget" in override else f"configs/{file_name}"
        key = f"nats-budget:{config.budget}:{source}"
        if key not in _logged:
            _logged.add(key)
            logger.info("vllm_sparse: budget=%s (%s) is not used by nats: its gates decide which "
                        "tokens are kept", config.budget, source)


def _check_sparsek(config: SparseConfig) -> None:
    """SparseK at start-up: scorer configured and present, no per-layer methods, an integer
    budget (k = budget - window is constant; the window is checked when the file is loaded)."""
    _check_trained(config, "sparsek", "scorer", "scorer", config.sparsek.scorer_path())
    if not isinstance(config.budget, int):
        raise ValueError(f"vllm_sparse: sparsek keeps a constant number of tokens per KV head: "
                         f"budget={config.budget!r} must be an integer token count (k = budget - "
                         "window), not a fraction of the context")


def _describe(config, file_name, file_data, override, backend_method) -> str:
    dump = config.model_dump()
    shown = {k: dump[k] for k in ("method", "budget", "layers", "eval_sparse_prefill_from",
                                  "kernels")}
    shown[config.method] = dump.get(config.method, {})
    file_keys, over_keys = _leaves(file_data), _leaves(override)
    parts = []
    for key, value in _leaves(shown).items():
        if key == "method" and backend_method:
            source = "--attention-backend"
        elif key in over_keys:
            source = "--additional-config"
        elif key in file_keys:
            source = f"configs/{file_name}"
        else:
            source = "default"
        parts.append(f"{key}={json.dumps(value)} ({source})")
    return "; ".join(parts)


_logged: set[str] = set()


def resolve_from_vllm(vllm_config, backend_method: str | None) -> SparseConfig:
    """`resolve` for a `VllmConfig`; logs the result once per process."""
    model = vllm_config.model_config
    served = model.served_model_name
    names = [model.model, getattr(model.hf_config, "_name_or_path", "")]
    names += served if isinstance(served, list) else [served or ""]
    additional = vllm_config.additional_config or {}
    override = additional.get("vllm_sparse") if isinstance(additional, dict) else None
    config, description = resolve(names, model_fingerprint(model.hf_config), override,
                                  backend_method)
    if description not in _logged:
        _logged.add(description)
        logger.info("vllm_sparse config: %s", description)
    return config
