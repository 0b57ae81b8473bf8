"""The tests' tiny model: a random 2-layer Llama with the embedded model's tokenizer (test-only code, kept out
of the product's modules)."""
from __future__ import annotations

import os
from pathlib import Path

from sft_core.models import ensure_embedded
from sft_core.workspace import Workspace, atomic_dir


def build_tiny_llama(out: str | os.PathLike, ws: Workspace | None = None, seed: int = 0,
                     hidden_size: int = 64, layers: int = 2) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the embedded model's tokenizer, for tests.

    Heads are 32 wide (hidden 64 -> 2 query heads, 1 KV head) so vLLM's CPU engine can serve it.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    ws = ws or Workspace.from_env()
    tok = AutoTokenizer.from_pretrained(ensure_embedded(ws))
    heads = max(1, hidden_size // 32)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        head_dim=32,  # vLLM's CPU attention kernels support head sizes 32, 64, 80, ... (not 16)
        # with the default 0.02, logits span about +-1.3 over 49k tokens and a test adapter cannot
        # learn a clear answer; 0.3 gives a sharp (still random) model that LoRA can steer
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with atomic_dir(out, exist_ok=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out
