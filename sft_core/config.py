"""Dataclasses: the one source of truth for every option.

Each field documents itself once, in ``metadata["help"]``. The same dataclass feeds the CLI
(:func:`add_arguments`), the UI form (:func:`fields_for_form`) and the worker processes, and is
resolved in layers: defaults < YAML file < explicit overrides (flags or form values).
Validation happens in ``validate()`` methods that raise :class:`ConfigError` naming the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sft_core import StudioError

T = TypeVar("T")


class ConfigError(StudioError):
    """A configuration value is invalid; ``where`` is the field name."""


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text (the only place the option is documented)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def env_opt(default: int, help: str, env: str) -> Any:
    """An int option whose default the environment variable ``env`` can change.

    The variable is read whenever a config is created, so every DataConfig() -- the app's, the
    CLI's, the library's -- honours it; explicit values (flags, YAML, arguments) still win."""
    def factory() -> int:
        if env not in os.environ:
            return default
        try:
            return int(os.environ[env].strip().replace("_", ""))
        except ValueError:
            raise ConfigError(f"cannot read {os.environ[env]!r} as int", env) from None
    return field(default_factory=factory, metadata={"help": help, "env": env})


# ---------------------------------------------------------------------------------------------
# Settings of the whole app (environment variables)
# ---------------------------------------------------------------------------------------------
@dataclass
class StudioSettings:
    home: str = opt("./workspace", "Workspace root (env SFT_STUDIO_HOME).")
    db_url: str = opt("", "Database URL; default sqlite:///<home>/studio.db (env SFT_STUDIO_DB_URL).")
    engine_url: str = opt("", "Attach to an external OpenAI-compatible vLLM endpoint instead of starting one (env SFT_STUDIO_ENGINE_URL).")
    engine: str = opt("auto", "Inference engine: auto (vLLM where it imports), vllm or hf (env SFT_STUDIO_ENGINE).")
    base_model: str = opt("smollm2-135m-instruct", "Default base model (env SFT_STUDIO_BASE_MODEL).")
    admin_password: str = opt("", "When set, training, deleting and other writes need login (env SFT_STUDIO_ADMIN_PASSWORD).")
    demo_mode: bool = opt(False, "Public demo: chat and rating stay open to anonymous visitors (env SFT_STUDIO_DEMO).")
    chat_concurrency: int = opt(16, "Chat events served at once; the engine batches their requests (env SFT_STUDIO_CHAT_CONCURRENCY).")
    light_concurrency: int = opt(16, "Quick UI events (polls, tables, rating, search) served at once (env SFT_STUDIO_LIGHT_CONCURRENCY).")
    heavy_concurrency: int = opt(2, "Heavy UI events (data check/import, index build, exports) at once, so they cannot starve the rest (env SFT_STUDIO_HEAVY_CONCURRENCY).")
    login_backoff_s: float = opt(1.0, "After 5 wrong admin passwords from one client, it waits this long, doubling with each further failure, at most 300 s (env SFT_STUDIO_LOGIN_BACKOFF_S).")
    queue_size: int = opt(64, "Events that may wait in the UI queue before visitors are told it is full (env SFT_STUDIO_QUEUE_SIZE).")

    @classmethod
    def from_env(cls, environ: typing.Mapping[str, str] | None = None) -> "StudioSettings":
        env = os.environ if environ is None else environ
        s = cls()
        for f in dataclasses.fields(cls):
            key = "SFT_STUDIO_" + ("DEMO" if f.name == "demo_mode" else f.name.upper())
            if key in env:
                setattr(s, f.name, _coerce(f, env[key], key))
        return s


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    format: str = opt("auto", "Input format: auto, alpaca, prompt_completion, messages, sharegpt, or table (with a column mapping).")
    mapping: dict = opt({}, "Column mapping for tables, canonical=column, e.g. instruction=question,response=answer,context=passage.")
    eval_fraction: float = opt(0.1, "Share of rows held out for evaluation during training.")
    test_fraction: float = opt(0.1, "Share of rows held out for the final test.")
    seed: int = opt(42, "Seed of the deterministic split.")
    max_tokens: int = opt(2048, "Rows longer than this many tokens (of the chosen model) are reported as over-long.")
    model: str = opt("smollm2-135m-instruct", "Model whose tokenizer measures lengths.")
    # Input limits (a public demo takes files from anyone): checked before and while a file is parsed,
    # so an oversized or hostile file is refused with a message instead of exhausting memory or CPU.
    max_upload_bytes: int = env_opt(50 * 1024 * 1024, "Largest data file in bytes; a Parquet file's or a saved "
                                    "`datasets` directory's uncompressed data counts too. Also the app's upload limit "
                                    "(env SFT_STUDIO_MAX_UPLOAD_BYTES; default 50 MiB, within a free HF Space's disk and memory).",
                                    "SFT_STUDIO_MAX_UPLOAD_BYTES")
    max_rows: int = env_opt(200_000, "Most rows read from one file; a longer file is refused "
                                     "(env SFT_STUDIO_MAX_ROWS).", "SFT_STUDIO_MAX_ROWS")
    max_field_chars: int = env_opt(100_000, "Longest text in any one field, in characters (about 25k tokens, three times "
                                            "the context of the models trained here; rows over max_tokens are already "
                                            "flagged as over-long) (env SFT_STUDIO_MAX_FIELD_CHARS).",
                                    "SFT_STUDIO_MAX_FIELD_CHARS")
    max_json_depth: int = env_opt(64, "Deepest nesting of JSON objects/lists in a row (a chat record needs 3) "
                                      "(env SFT_STUDIO_MAX_JSON_DEPTH).", "SFT_STUDIO_MAX_JSON_DEPTH")

    def validate(self) -> None:
        for name in ("max_upload_bytes", "max_rows", "max_field_chars", "max_json_depth"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, got {getattr(self, name)}", name)
        for name in ("eval_fraction", "test_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"must be in [0, 1), got {v}", name)
        if self.eval_fraction + self.test_fraction >= 1.0:
            raise ConfigError("eval_fraction + test_fraction must leave rows for training", "test_fraction")
        if self.max_tokens <= 0:
            raise ConfigError(f"must be positive, got {self.max_tokens}", "max_tokens")


# ---------------------------------------------------------------------------------------------
# Generic machinery: layering, CLI flags, UI forms
# ---------------------------------------------------------------------------------------------
def _base_type(f: dataclasses.Field) -> type:
    tp = f.type
    if isinstance(tp, str):
        tp = eval(tp, {**vars(typing), "Any": Any})  # dataclass annotations are strings here
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
        origin = typing.get_origin(tp)
    return origin or tp


def _coerce(f: dataclasses.Field, value: Any, where: str | None = None) -> Any:
    """Turn a string (flag, env, form) or YAML value into the field's type, or raise ConfigError."""
    where = where or f.name
    tp = _base_type(f)
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        if tp is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return list(value)
        if tp is dict:
            if isinstance(value, str):
                out = {}
                for part in (p for p in value.split(",") if p.strip()):
                    if "=" not in part:
                        raise ValueError(f"expected key=value, got {part!r}")
                    k, v = part.split("=", 1)
                    out[k.strip()] = v.strip()
                return out
            return dict(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot read {value!r} as {tp.__name__} ({e})", where) from None
    return value


def load_config(cls: type[T], yaml_path: str | os.PathLike | None = None, overrides: dict | None = None) -> T:
    """Resolve a config: dataclass defaults < YAML file < overrides (None values are ignored)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        p = Path(yaml_path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError("config file not found", str(p)) from None
        except OSError as e:  # a directory, no permission
            raise ConfigError(f"cannot read the config file: {e.strerror or e}", str(p)) from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"not valid YAML: {' '.join(str(e).split())[:300]}", str(p)) from None
        except RecursionError:
            raise ConfigError("not a config: nested too deeply", str(p)) from None
        if not isinstance(loaded, dict):
            raise ConfigError("expected a mapping of option: value", str(p))
        for k, v in loaded.items():
            if k not in names:
                raise ConfigError(f"unknown option {k!r} in {p}", k)
            values[k] = _coerce(names[k], v, k)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in names:
            raise ConfigError(f"unknown option {k!r}", k)
        values[k] = _coerce(names[k], v, k)
    cfg = cls(**values)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field (default None, so an unset flag never overrides the YAML layer)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if _base_type(f) is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"{help_} (default {default})")
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(),
                                help=f"{help_} (default {default})")


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict:
    return {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}


def fields_for_form(cls: type) -> list[dict]:
    """Field descriptions for building a UI form: name, type, default, help, choices."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append({"name": f.name, "type": _base_type(f).__name__, "default": default,
                    "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices")})
    return out


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------
# Decoding (serving, chat, evals)
# ---------------------------------------------------------------------------------------------
@dataclass
class DecodingConfig:
    temperature: float = opt(0.0, "Sampling temperature; 0 means greedy (used for evals).")
    top_p: float = opt(1.0, "Nucleus sampling probability mass.")
    max_new_tokens: int = opt(256, "Most tokens to generate per answer.")
    stop: list = opt([], "Strings that end generation.")
    seed: int = opt(0, "Sampling seed (ignored when greedy).")

    def validate(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.top_p}", "top_p")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"must be positive, got {self.max_new_tokens}", "max_new_tokens")


# ---------------------------------------------------------------------------------------------
# Serving (H3: sft_core/serving/, `sft-studio serve`)
# ---------------------------------------------------------------------------------------------
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts for --max-lora-rank


@dataclass
class ServeConfig:
    engine: str = opt("auto", "Inference engine: auto (vLLM where it imports), vllm or hf.", choices=["auto", "vllm", "hf"])
    url: str = opt("", "Attach to an external OpenAI-compatible vLLM endpoint (http://host:port) instead of starting one.")
    port: int = opt(0, "Port of the managed vLLM server (0 picks a free localhost port).")
    max_loras: int = opt(4, "Adapters vLLM can apply within one batch (--max-loras).")
    max_cpu_loras: int = opt(16, "Adapters vLLM keeps loaded in host memory (--max-cpu-loras).")
    max_lora_rank: int = opt(0, "Largest LoRA rank vLLM accepts (--max-lora-rank; one of 1, 8, 16, 32, 64, 128, 256, 320, 512). "
                                "0 = auto: the smallest that fits the adapters (at least 16), raised by a restart when a larger "
                                "one is loaded; vLLM computes every LoRA at this rank, so a needlessly large one is slow.")
    max_model_len: int = opt(2048, "Longest prompt + answer in tokens (--max-model-len).")
    dtype: str = opt("auto", "Weights dtype in vLLM: auto, float32, bfloat16, float16.", choices=["auto", "float32", "bfloat16", "float16"])
    kv_cache_gib: int = opt(1, "CPU only: GiB of RAM for vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE).")
    gpu_memory_utilization: float = opt(0.85, "CUDA only: share of GPU memory vLLM may use.")
    startup_timeout_s: float = opt(600.0, "Seconds to wait for the vLLM server to become healthy.")
    max_concurrency: int = opt(64, "Most requests in flight to vLLM at once from one generate_batch call.")
    request_timeout_s: float = opt(600.0, "Seconds before one request to vLLM times out.")
    max_restarts: int = opt(3, "Consecutive failed restarts before the engine gives up (state 'failed').")
    gpus: str = field(default_factory=lambda: os.environ.get("SFT_STUDIO_ENGINE_GPUS", "").strip(), metadata={
        "help": "CUDA only: GPU indices for the managed vLLM engine, e.g. 1 or 2,3 (env SFT_STUDIO_ENGINE_GPUS). "
                "Empty = auto: with one GPU the engine and training share it in turn (the engine yields it while a "
                "training job runs); with several the engine gets the last and training the others.",
        "env": "SFT_STUDIO_ENGINE_GPUS"})
    gpu_yield: str = field(default_factory=lambda: os.environ.get("SFT_STUDIO_ENGINE_GPU_YIELD", "stop").strip(), metadata={
        "help": "CUDA only, one GPU shared with training: how the engine gives it to a training job "
                "(env SFT_STUDIO_ENGINE_GPU_YIELD). stop = stop the server and start it again after (frees "
                "everything; back in the time of a start); sleep = vLLM's sleep mode level 1 (weights wait in host "
                "RAM, back in seconds; needs RAM for the whole base).",
        "env": "SFT_STUDIO_ENGINE_GPU_YIELD", "choices": ["stop", "sleep"]})
    quantization: str = field(default_factory=lambda: os.environ.get("SFT_STUDIO_ENGINE_QUANTIZATION", "none").strip(),
                              metadata={
        "help": "CUDA only: quantize the base model's weights as vLLM loads it (--quantization; env "
                "SFT_STUDIO_ENGINE_QUANTIZATION). fp8 = half the memory of a 16-bit base (weight-only on compute "
                "7.5-8.6, such as a T4; W8A8 from 8.9); LoRA adapters apply on top. none = the checkpoint as it is.",
        "env": "SFT_STUDIO_ENGINE_QUANTIZATION", "choices": ["none", "fp8"]})

    def validate(self) -> None:
        if self.engine not in ("auto", "vllm", "hf"):
            raise ConfigError(f"must be auto, vllm or hf, got {self.engine!r}", "engine")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"must start with http:// or https://, got {self.url!r}", "url")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"must be a port number, got {self.port}", "port")
        if self.max_lora_rank != 0 and self.max_lora_rank not in LORA_RANKS:
            raise ConfigError(f"must be 0 (auto) or one of {', '.join(map(str, LORA_RANKS))}, got {self.max_lora_rank}",
                              "max_lora_rank")
        for name in ("max_loras", "max_cpu_loras", "max_model_len", "kv_cache_gib", "max_concurrency"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, got {getattr(self, name)}", name)
        if self.max_cpu_loras < self.max_loras:
            raise ConfigError(f"must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras}", "max_cpu_loras")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}", "dtype")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.gpu_memory_utilization}", "gpu_memory_utilization")
        if self.gpu_yield not in ("stop", "sleep"):
            raise ConfigError(f"must be stop or sleep, got {self.gpu_yield!r}", "gpu_yield")
        if self.quantization not in ("none", "fp8"):
            raise ConfigError(f"must be none or fp8, got {self.quantization!r}", "quantization")
        if self.gpus and not all(t.strip().isdigit() for t in self.gpus.split(",")):
            raise ConfigError(f"expected GPU indices like 1 or 2,3, got {self.gpus!r}", "gpus")


# ---------------------------------------------------------------------------------------------
# Training (sft_core/train.py, sft_core/jobs.py, `sft-studio train`)
# ---------------------------------------------------------------------------------------------
MAX_SERVABLE_RANK = 64  # the engines start vLLM with --max-lora-rank 64
TRAIN_MODES = ("sft", "raft")  # TrainConfig.mode; preference runs have their own config (PreferenceConfig)
MAX_RAFT_DISTRACTORS = 20


def _validate_lora_and_schedule(cfg) -> None:
    """The LoRA and optimisation fields that SFT (TrainConfig) and preference runs (PreferenceConfig) share."""
    if not 1 <= cfg.lora_r <= MAX_SERVABLE_RANK:
        raise ConfigError(f"must be between 1 and {MAX_SERVABLE_RANK}, got {cfg.lora_r}", "lora_r")
    if cfg.lora_alpha <= 0:
        raise ConfigError(f"must be positive, got {cfg.lora_alpha}", "lora_alpha")
    if not 0 <= cfg.lora_dropout < 1:
        raise ConfigError(f"must be in [0, 1), got {cfg.lora_dropout}", "lora_dropout")
    if not cfg.learning_rate > 0:
        raise ConfigError(f"must be positive, got {cfg.learning_rate}", "learning_rate")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"must be in [0, 1), got {cfg.warmup_ratio}", "warmup_ratio")
    if cfg.max_steps < 0 or (cfg.max_steps == 0 and not cfg.epochs > 0):
        raise ConfigError("give epochs > 0 or max_steps > 0", "max_steps" if cfg.max_steps < 0 else "epochs")
    for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"must be positive, got {getattr(cfg, name)}", name)


@dataclass
class TrainConfig:
    dataset: str = opt("", "Dataset name (imported with `sft-studio data import` or the example domain `pydocs`).")
    dataset_version: str = opt("", "Dataset version (content hash); empty = the latest.")
    base_model: str = opt("smollm2-135m-instruct", "Base model: the embedded name, a local model directory or a hub id.")
    run_name: str = opt("", "Run id (also the adapter's name when served); empty = generated.")
    lora_r: int = opt(16, "LoRA rank (1-64; vLLM serves ranks up to 64).")
    lora_alpha: int = opt(32, "LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA path.")
    target_modules: str = opt("all-linear", "Modules to adapt: all-linear, or comma-separated names like q_proj,v_proj.")
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    learning_rate: float = opt(2e-4, "Peak learning rate.")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule.", choices=["cosine", "linear", "constant", "constant_with_warmup"])
    warmup_ratio: float = opt(0.03, "Share of steps for linear warm-up.")
    epochs: float = opt(1.0, "Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = use epochs).")
    batch_size: int = opt(8, "Sequences per device per step.")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    max_length: int = opt(512, "Longest tokenised example (prompt + answer); longer ones are truncated.")
    packing: bool = opt(False, "Pack several examples into each sequence (padding-free). For CUDA with FlashAttention; on CPU it is slower (dense block mask, see bench/train_throughput.py).")
    group_by_length: bool = opt(True, "Batch examples of similar length together (less padding, same result in expectation).")
    completion_only_loss: bool = opt(True, "Loss on the answer only (prompt tokens masked).")
    seed: int = opt(42, "Random seed (data order, LoRA init, dropout).")
    eval_steps: int = opt(0, "Evaluate on the eval split every N steps (0 = at the end of each epoch, or at every checkpoint with early stopping).")
    save_steps: int = opt(50, "Save a checkpoint every N steps (resume starts from the last one).")
    early_stopping_patience: int = opt(0, "Stop after this many evaluations without eval-loss improvement, then keep the best checkpoint (0 = off; needs an eval split; save_steps moves down to a multiple of eval_steps).")
    logging_steps: int = opt(1, "Log train loss every N steps.")
    load_in_4bit: bool = opt(False, "CUDA only: QLoRA, base weights in 4-bit NF4 (bitsandbytes).")
    gradient_checkpointing: bool = opt(True, "CUDA only: recompute activations to save memory.")
    num_gpus: int = opt(0, "GPUs for one run: 0 = all that training may use (with several GPUs, all but the inference engine's); more than one launches with `accelerate launch`.")
    report_to: str = opt("none", "Extra loggers: none or tensorboard (event files in runs/<id>/tensorboard).", choices=["none", "tensorboard"])
    # Retrieval-aware fine-tuning (sft_core/raft.py). The run's config keeps ``mode`` as the one marker of how
    # a run was trained ("preference" runs write it too: jobs._train_build and the systems read it).
    mode: str = opt("sft", "Training prompts: sft = each row as it is; raft = retrieval-aware (RAFT): each question "
                           "with passages from the knowledge base kb (the row's own chunk, the oracle, plus "
                           "raft_distractors others), built exactly as the raft:RUN system prompts at inference.",
                    choices=list(TRAIN_MODES))
    kb: str = opt("", "Knowledge base the RAFT passages come from (mode raft only; `sft-studio kb build`).")
    raft_distractors: int = opt(3, "RAFT: retrieved passages besides the oracle in each prompt (never the oracle "
                                   "itself); raft:RUN retrieves this many + 1 at inference.")
    raft_oracle_drop: float = opt(0.2, "RAFT: share of rows whose prompt leaves the oracle out (distractors only), "
                                       "drawn per row from the seed: the adapter learns to answer when retrieval misses.")
    raft_cite: bool = opt(False, "RAFT: the trained answer ends by citing the oracle passage's label, e.g. \" [2]\" "
                                 "(rows without the oracle cite nothing).")
    raft_context_tokens: int = opt(1024, "RAFT: token budget (base model tokens) of instruction, passages and question "
                                         "in each prompt, the rag systems' budget by default; raft:RUN uses the run's "
                                         "value; max_length must exceed it.")

    def validate(self) -> None:
        """Checks that need no model or data; train.validate_train_config adds those."""
        if not self.dataset:
            raise ConfigError("choose a dataset", "dataset")
        _validate_lora_and_schedule(self)
        self._validate_mode()
        for name in ("eval_steps", "early_stopping_patience", "num_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", name)
        if self.lr_scheduler not in ("cosine", "linear", "constant", "constant_with_warmup"):
            raise ConfigError(f"unknown schedule {self.lr_scheduler!r}", "lr_scheduler")
        if self.report_to not in ("none", "tensorboard"):
            raise ConfigError(f"must be none or tensorboard, got {self.report_to!r}", "report_to")
        if not self.target_modules.strip():
            raise ConfigError("must be all-linear or module names", "target_modules")

    def _validate_mode(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ConfigError(f"must be {' or '.join(TRAIN_MODES)}, got {self.mode!r}", "mode")
        if self.mode != "raft":
            if self.kb:
                raise ConfigError("a knowledge base is used only by RAFT training: set mode raft, or leave kb empty",
                                  "kb")
            return
        if not self.kb:
            raise ConfigError("RAFT builds its prompts from a knowledge base: choose one (--kb NAME)", "kb")
        if not 0 <= self.raft_distractors <= MAX_RAFT_DISTRACTORS:
            raise ConfigError(f"must be between 0 and {MAX_RAFT_DISTRACTORS}, got {self.raft_distractors}",
                              "raft_distractors")
        if not 0 <= self.raft_oracle_drop < 1:
            raise ConfigError(f"must be in [0, 1), got {self.raft_oracle_drop}", "raft_oracle_drop")
        if self.raft_context_tokens <= 0:
            raise ConfigError(f"must be positive, got {self.raft_context_tokens}", "raft_context_tokens")
        if self.max_length <= self.raft_context_tokens:
            raise ConfigError(f"{self.max_length} tokens leave no room for the answer after RAFT prompts of up to "
                              f"{self.raft_context_tokens} (raft_context_tokens): raise max_length above it "
                              f"(e.g. {self.raft_context_tokens + 256}) or lower raft_context_tokens", "max_length")


# Pairwise losses of TRL 1.16's DPOConfig.loss_type (trl/trainer/dpo_config.py), without "sft" (plain NLL on
# the chosen side: no preference in it). tests/test_preference.py checks this list against the installed TRL.
PREFERENCE_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                     "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


@dataclass
class PreferenceConfig:
    """Preference tuning (sft_core/pref_train.py, `sft-studio pref train`): TRL's DPOTrainer on a preference dataset."""
    dataset: str = opt("", "Preference dataset (pairs built with `sft-studio pref build`).")
    dataset_version: str = opt("", "Dataset version (content hash); empty = the latest.")
    from_run: str = opt("", "Finished SFT run to start from: its adapter is trained further, and the model it gives (base + that adapter) is the reference. Empty = a new LoRA on base_model, the base model being the reference.")
    base_model: str = opt("", "Base model: empty = the from_run's own base (another one is refused), or without from_run the studio's default (SFT_STUDIO_BASE_MODEL).")
    run_name: str = opt("", "Run id (also the adapter's name when served); empty = generated.")
    loss_type: str = opt("sigmoid", "Pairwise loss: sigmoid = DPO; ipo, hinge, robust (noisy labels, with label_smoothing), apo_zero, ... (TRL's DPOTrainer losses).", choices=list(PREFERENCE_LOSSES))
    beta: float = opt(0.1, "How far the policy may move from the reference: higher = closer to it (for ipo: the regularisation tau).")
    label_smoothing: float = opt(0.0, "Assumed share of flipped labels for robust (in [0, 0.5)); exo_pair needs > 0 (1e-3).")
    learning_rate: float = opt(5e-5, "Peak learning rate.")
    lr_scheduler: str = opt("cosine", "Learning-rate schedule.", choices=["cosine", "linear", "constant", "constant_with_warmup"])
    warmup_ratio: float = opt(0.1, "Share of steps for linear warm-up.")
    epochs: float = opt(1.0, "Passes over the training pairs (ignored when max_steps > 0).")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = use epochs).")
    batch_size: int = opt(4, "Pairs per device per step (each pair is two sequences).")
    grad_accum: int = opt(1, "Gradient accumulation steps.")
    max_length: int = opt(1024, "Longest prompt + answer in tokens (TRL 1.x has this one limit); longer ones keep their start, and pairs whose prompt alone reaches it are dropped.")
    lora_r: int = opt(16, "LoRA rank of a new adapter (without from_run; 1-64, vLLM serves up to 64).")
    lora_alpha: int = opt(32, "LoRA alpha of a new adapter (without from_run).")
    lora_dropout: float = opt(0.0, "Dropout on a new LoRA path (without from_run; TRL disables dropout while training preference losses anyway).")
    target_modules: str = opt("all-linear", "Modules a new adapter adapts (without from_run): all-linear, or names like q_proj,v_proj.")
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling for a new adapter (without from_run).")
    seed: int = opt(42, "Random seed (data order, LoRA init).")
    eval_steps: int = opt(0, "Evaluate the held-out pairs every N steps (0 = at the end of each epoch).")
    save_steps: int = opt(50, "Save a checkpoint every N steps (resume starts from the last one).")
    logging_steps: int = opt(1, "Log loss and rewards every N steps.")
    gradient_checkpointing: bool = opt(True, "CUDA only: recompute activations to save memory.")
    num_gpus: int = opt(0, "GPUs for one run: 0 = all visible; more than one launches with `accelerate launch`.")

    def validate(self) -> None:
        """Checks that need no model or data; pref_train.validate_pref_config adds those."""
        if not self.dataset:
            raise ConfigError("choose a preference dataset", "dataset")
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ConfigError(f"unknown loss {self.loss_type!r}; choose from {', '.join(PREFERENCE_LOSSES)}", "loss_type")
        if not self.beta > 0:
            raise ConfigError(f"must be positive, got {self.beta}", "beta")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"must be in [0, 0.5), got {self.label_smoothing}", "label_smoothing")
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ConfigError("exo_pair needs label_smoothing > 0 (its paper uses 1e-3)", "label_smoothing")
        _validate_lora_and_schedule(self)
        for name in ("eval_steps", "num_gpus"):
            if getattr(self, name) < 0:
                raise ConfigError(f"must be >= 0, got {getattr(self, name)}", name)
        if self.lr_scheduler not in ("cosine", "linear", "constant", "constant_with_warmup"):
            raise ConfigError(f"unknown schedule {self.lr_scheduler!r}", "lr_scheduler")
        if not self.target_modules.strip():
            raise ConfigError("must be all-linear or module names", "target_modules")


# ---------------------------------------------------------------------------------------------
# Retrieval (sft_core/retrieval.py, `sft-studio kb ...`)
# ---------------------------------------------------------------------------------------------
@dataclass
class RetrievalConfig:
    chunk_tokens: int = opt(256, "Chunk size in embedder tokens.")
    chunk_overlap: int = opt(32, "Tokens shared by consecutive chunks.")
    embedder: str = opt("all-minilm-l6-v2", "Sentence-transformers model: the embedded name, a model dir, or a hub id.")
    top_k: int = opt(5, "Passages returned per query.")
    rrf_k: int = opt(60, "Reciprocal-rank-fusion constant (larger = flatter fusion).")
    reranker: str = opt("", "Optional cross-encoder model (dir or hub id) to rerank the fused candidates.")
    text_field: str = opt("text", "Field holding the text in .jsonl documents.")

    def validate(self) -> None:
        if self.chunk_tokens < 16:
            raise ConfigError(f"must be at least 16, got {self.chunk_tokens}", "chunk_tokens")
        if not 0 <= self.chunk_overlap < self.chunk_tokens:
            raise ConfigError(f"must be in [0, chunk_tokens), got {self.chunk_overlap}", "chunk_overlap")
        if self.top_k <= 0:
            raise ConfigError(f"must be positive, got {self.top_k}", "top_k")
        if self.rrf_k <= 0:
            raise ConfigError(f"must be positive, got {self.rrf_k}", "rrf_k")
