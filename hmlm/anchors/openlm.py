"""OpenLM-style decoder-only transformer: the anchor model.

Pre-norm blocks of (RMSNorm -> attention with QK-norm and RoPE) and (RMSNorm -> SwiGLU FFN), no biases,
one final RMSNorm, optionally tied input/output embeddings. The shapes of the presets reproduce the
paper's anchors exactly (Appendix A): with a 50,432-token vocabulary `160m`, `410m` and `1.4b` have
163,510,016 / 411,665,408 / 1,439,893,504 parameters.

Memory hooks: at each memory site (see hmlm.protocols.MEMORY_SITES) the model asks the MemoryContext
for a delta and adds it; with memory=None nothing is asked and the model is a plain LM.

Packed sequences: with `doc_ids` attention is causal *within* each document and RoPE positions restart
at 0 for each document, so a document gets the same logits packed or alone.

Cached keys and values: with `cache=KVCache()` the new tokens also attend to every position the cache holds (their
RoPE positions continue after them) and the cache is extended with the new tokens, so a shared context is computed
once for all of its continuations (multiple-choice scoring) or for every next token (decoding).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from hmlm.protocols import AnchorShape, MemoryContext

if TYPE_CHECKING:  # only a type here; keeps the model importable without omegaconf
    from hmlm.config import AnchorConfig


@dataclass
class OpenLMConfig:
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    ffn_dim: int                 # SwiGLU inner width
    vocab_size: int
    tied_embeddings: bool = True
    rope_base: float = 100000.0  # paper: RoPE frequency 100k
    qk_norm: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for key in ("n_layers", "d_model", "n_heads", "head_dim", "ffn_dim", "vocab_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"OpenLMConfig.{key} must be a positive int, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"OpenLMConfig.head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        if self.rope_base <= 1:
            raise ValueError(f"OpenLMConfig.rope_base must be > 1, got {self.rope_base}")


# Architecture presets (vocab_size comes from the tokenizer). Table 4-6 of the paper; attention inner
# width is n_heads * head_dim, which for 160m (384) is smaller than d_model (512).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, head_dim=32, ffn_dim=384, tied_embeddings=True),
    "160m": dict(n_layers=35, d_model=512, n_heads=12, head_dim=32, ffn_dim=2048, tied_embeddings=True),
    "410m": dict(n_layers=24, d_model=1024, n_heads=16, head_dim=64, ffn_dim=2816, tied_embeddings=False),
    "1.4b": dict(n_layers=24, d_model=2048, n_heads=16, head_dim=128, ffn_dim=5632, tied_embeddings=False),
}

# AnchorConfig fields that override a preset when not None
_OVERRIDES = ("n_layers", "d_model", "n_heads", "head_dim", "ffn_dim", "tied_embeddings", "rope_base", "qk_norm")


class RMSNorm(nn.Module):
    """Weight-only RMSNorm; statistics in float32 so bf16 activations do not lose precision."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., T, head_dim] in float32 for integer positions [..., T] (rotate-half layout).

    Computed per forward for just the positions needed: a few thousand trig ops, negligible next to
    the matmuls, and nothing to keep in sync across devices, meta construction or checkpoints.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq            # [..., T, dh/2]
    angles = torch.cat([angles, angles], dim=-1)                    # [..., T, dh]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, dh] by cos/sin broadcastable to it; result in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def document_mask(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal mask [B, 1, T, T] (True = may attend) and per-token positions [B, T].

    Token i attends to j iff j <= i and doc_ids[i] == doc_ids[j] >= 0; a padding token (doc id -1)
    attends to itself only, so no row of the mask is empty (an empty row would give NaN). The position
    of a token is the number of earlier tokens it may attend to, i.e. its index within its document.
    """
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device)
    causal = idx[None, :] <= idx[:, None]                                     # [T, T]: j <= i
    same = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
    mask = (same & causal) | torch.eye(T, dtype=torch.bool, device=doc_ids.device)
    positions = mask.sum(-1) - 1
    return mask.unsqueeze(1), positions


class KVCache:
    """Per layer, the keys (after QK-norm and RoPE) and values [B, H, T, dh] of the positions seen so far."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this forward's keys/values for `layer`; return everything the layer attends to."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]

    def repeat(self, n: int) -> "KVCache":
        """A cache of n rows that all continue this cache's single row (views; extending it copies)."""
        if self.keys and self.keys[0].shape[0] != 1:
            raise ValueError(f"KVCache.repeat needs a cache of one row, this one has {self.keys[0].shape[0]}")
        out = KVCache()
        out.keys = [k.expand(n, -1, -1, -1) for k in self.keys]
        out.values = [v.expand(n, -1, -1, -1) for v in self.values]
        return out


class Attention(nn.Module):
    def __init__(self, cfg: OpenLMConfig):
        super().__init__()
        inner = cfg.n_heads * cfg.head_dim
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)
        # QK-norm over the full projection width (OpenLM style), not per head
        self.q_norm: nn.Module = RMSNorm(inner, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(inner, cfg.norm_eps) if cfg.qk_norm else nn.Identity()

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, H*dh] -> [B, H, T, dh]
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                memory: MemoryContext | None, layer: int, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if memory is not None:
            q, k, v = (_plus(t, memory.delta(site, layer, h))
                       for t, site in ((q, "attn_q"), (k, "attn_k"), (v, "attn_v")))
        q, k, v = self._heads(self.q_norm(q)), self._heads(self.k_norm(k)), self._heads(v)
        q_pre_rope = q
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # lets CUDA pick flash attention
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if memory is not None:
            out = _plus(out, memory.delta("attn_kv", layer, q_pre_rope))
        B, H, T, dh = out.shape
        concat = out.transpose(1, 2).reshape(B, T, H * dh)
        o = self.o_proj(concat)
        if memory is not None:
            o = _plus(o, memory.delta("attn_o", layer, concat))
        return o


class SwiGLU(nn.Module):
    def __init__(self, cfg: OpenLMConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)  # up
        self.w3 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)  # down

    def forward(self, x: torch.Tensor, memory: MemoryContext | None = None, layer: int = 0) -> torch.Tensor:
        if memory is None:
            return self.w3(F.silu(self.w1(x)) * self.w2(x))
        gate = _plus(self.w1(x), memory.delta("ffn_gate", layer, x))
        up = _plus(self.w2(x), memory.delta("ffn_up", layer, x))
        hidden = F.silu(gate) * up
        return _plus(self.w3(hidden), memory.delta("ffn_down", layer, hidden))


class Block(nn.Module):
    def __init__(self, cfg: OpenLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                memory: MemoryContext | None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, memory, self.layer, cache)
        h = self.ffn_norm(x)
        out = self.ffn(h, memory, self.layer)
        if memory is not None:
            out = _plus(out, memory.delta("ffn", self.layer, h))
        return x + out


def _plus(t: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return t if delta is None else t + delta


class OpenLMAnchor(nn.Module):
    """The anchor LM. forward(input_ids [B,T], *, memory=None, doc_ids=None, cache=None) -> logits [B,T,V]."""

    def __init__(self, config: OpenLMConfig):
        super().__init__()
        self.config = config
        self.shape = AnchorShape(n_layers=config.n_layers, d_model=config.d_model, n_heads=config.n_heads,
                                 head_dim=config.head_dim, ffn_dim=config.ffn_dim)
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tied_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: AnchorConfig, *, vocab_size: int) -> "OpenLMAnchor":
        """Preset `cfg.preset`, then every non-None field of `cfg` overrides it."""
        if cfg.preset not in PRESETS:
            raise ValueError(f"anchor.preset: unknown preset {cfg.preset!r}; known presets: {', '.join(PRESETS)}")
        kwargs = dict(PRESETS[cfg.preset])
        kwargs.update({k: getattr(cfg, k) for k in _OVERRIDES if getattr(cfg, k) is not None})
        kwargs["vocab_size"] = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
        try:
            config = OpenLMConfig(**kwargs)
        except ValueError as exc:
            raise ValueError(f"anchor (preset {cfg.preset!r} with overrides): {exc}") from None
        return cls(config)

    def reset_parameters(self) -> None:
        """normal(0, init_std) for matrices; residual output projections scaled by 1/sqrt(2 L) (GPT-2)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith("attn.o_proj") or name.endswith("ffn.w3")
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # lm_head (when untied) was drawn above; when tied it is tok_emb.weight, drawn once more is harmless

    def num_params(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> KVCache:
        """An empty cache for `forward(..., cache=)`."""
        return KVCache()

    def forward(self, input_ids: torch.Tensor, *, memory: MemoryContext | None = None,
                doc_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        if cache is not None and doc_ids is not None:
            raise ValueError("doc_ids (packed documents) and cache= cannot be combined")
        if doc_ids is None:
            # causal over the cached positions and the new ones; None lets SDPA use its own causal kernel
            mask = None if past == 0 else torch.ones(T, past + T, dtype=torch.bool,
                                                     device=input_ids.device).tril(past)
            positions = torch.arange(past, past + T, device=input_ids.device)  # [T]
        else:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} must equal input_ids shape {(B, T)}")
            mask, positions = document_mask(doc_ids.to(input_ids.device))        # [B,1,T,T], [B,T]
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_base)
        # broadcast over heads: [T, dh] -> [1, 1, T, dh]; [B, T, dh] -> [B, 1, T, dh]
        cos, sin = (c.unsqueeze(-3) if c.dim() == 3 else c[None, None] for c in (cos, sin))

        x = self.tok_emb(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin, mask, memory, cache)
        return self.lm_head(self.norm(x))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
