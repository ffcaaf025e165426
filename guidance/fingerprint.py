"""Exact digests of text encoders and tokenizers: the parts of the text-embedding cache key that
say which weights and which vocabulary produced an embedding.

Every tensor is hashed from its raw bytes, one at a time, in a streaming hasher, once per model
load: about half a second for a 340M-parameter encoder in float16, several seconds for SD3's
T5-XXL (9.5 GB), still small next to loading those weights.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch

# Config entries that name where or how a model was loaded, not what it computes.
_LOAD_DETAILS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                 "_attn_implementation", "_attn_implementation_autoset", "architectures")


def module_digest(module: Optional[torch.nn.Module]) -> str:
    """Hash of a transformers text encoder: its config (minus paths and versions) and the name,
    shape, dtype and bytes of every tensor in its state dict."""
    if module is None:
        return "none"
    cfg = module.config.to_dict()
    for key in _LOAD_DETAILS:
        cfg.pop(key, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        # One tensor at a time, so at most one tensor is copied off the GPU at once.
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu()
        h.update(raw.numpy())
    return h.hexdigest()[:24]


def tokenizer_digest(tokenizer) -> str:
    """Hash of what decides a tokenizer's ids: its full vocabulary and merges (with the
    normaliser, pre-tokeniser and added tokens of a fast tokenizer), special tokens, length limit
    and padding side."""
    if tokenizer is None:
        return "none"
    h = hashlib.sha256()
    settings = {"class": type(tokenizer).__name__,
                "model_max_length": getattr(tokenizer, "model_max_length", None),
                "special_tokens": getattr(tokenizer, "special_tokens_map", {}),
                "padding_side": getattr(tokenizer, "padding_side", None),
                "truncation_side": getattr(tokenizer, "truncation_side", None)}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # These hold whatever the last call asked for, not what the tokenizer is.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
        return h.hexdigest()[:24]
    # A pure-Python tokenizer (transformers 4 loads SD's CLIPTokenizer so).
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    ranks = getattr(tokenizer, "bpe_ranks", None)
    if ranks:
        h.update(json.dumps(sorted((rank, list(pair)) for pair, rank in ranks.items())).encode())
    sentencepiece = getattr(tokenizer, "sp_model", None)
    if sentencepiece is not None:
        h.update(sentencepiece.serialized_model_proto())
    return h.hexdigest()[:24]
