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

Speed (docs/benchmarks.md): q/k/v and SwiGLU gate/up are one matmul each (`qkv`, `w12`; model directories written
before the fusion load through a state-dict pre-hook), norms use the fused `F.rms_norm` kernel, RoPE runs in the
activation dtype with fp32-computed tables, attention without documents is causal SDPA (flash on CUDA), and with
documents either SDPA with a dense [B,1,T,T] mask (eager) or flex attention with a block mask (under torch.compile,
where flex attention is fused; it skips the blocks no document crosses). `hidden_states` + `output_weight` let the
loss (hmlm.loss) fuse the head with a chunked cross-entropy instead of materialising logits for the whole batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from hmlm.protocols import AnchorShape, MemoryContext, compute_dtype

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



@dataclass
class OpenLMOptions:
    """`anchor.options` of the openlm anchor: a preset, then every field set (not None) overrides it."""

    preset: str = "tiny"         # tiny / 160m / 410m / 1.4b
    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    head_dim: Optional[int] = None
    ffn_dim: Optional[int] = None
    tied_embeddings: Optional[bool] = None
    rope_base: Optional[float] = None
    qk_norm: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} (preset); known presets: {', '.join(PRESETS)}")

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "preset" and v is not None}


class RMSNorm(nn.Module):
    """Weight-only RMSNorm via the fused `F.rms_norm` kernel (statistics accumulate in float32 inside it).

    The weight is cast to the input's dtype because the fused kernel needs matching dtypes (a float32 weight on a
    bf16 input falls back to the unfused composite with a warning); for float32 inputs nothing changes.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.eps)


# Positions whose RoPE tables the anchor keeps precomputed (a non-persistent buffer: 2 x 8192 x head_dim floats, 8 MB
# at head_dim 128). Why not compute them per forward: under torch.compile, Inductor inlines the cheap trig into every
# consumer kernel -- each layer's q/k rotation, forward and backward -- and those kernels then cost 5 ms per step at
# the 160M shape (8 x 2048 tokens, H100). Read from a buffer, the rotation is a plain elementwise kernel. Longer
# sequences fall back to computing the tables for the positions needed.
ROPE_TABLE_POSITIONS = 8192


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., T, head_dim] in float32 for integer positions [..., T] (rotate-half layout)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq            # [..., T, dh/2]
    angles = torch.cat([angles, angles], dim=-1)                    # [..., T, dh]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, dh] by cos/sin broadcastable to it, in x's dtype (pass tables already in that dtype).

    rotate-half form: x·cos + (-x2, x1)·sin; the tables are computed in float32 (rope_tables) and rounded once.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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
    return mask.unsqueeze(1), document_positions(doc_ids)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Each token's index among the earlier tokens of its document ([B, T]; 0 for padding, doc id < 0).

    Equal to the row sums of `document_mask` minus one, in O(T log T) instead of O(T^2): a stable sort by document
    groups each document's tokens in order, and a token's rank inside its group is its position.
    """
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    # padding tokens get a group of their own (rank 0), keyed above every document id
    group = torch.where(doc_ids >= 0, doc_ids, doc_ids.max() + 1 + idx)
    order = torch.sort(group, dim=1, stable=True).indices
    sorted_group = group.gather(1, order)
    starts = torch.ones_like(sorted_group, dtype=torch.bool)
    starts[:, 1:] = sorted_group[:, 1:] != sorted_group[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return torch.empty_like(idx).scatter_(1, order, idx - first)


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        return False
    return True


def document_block_mask(doc_ids: torch.Tensor) -> Any:
    """flex attention BlockMask of `document_mask` (same rule, computed per block: fully masked blocks are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape

    def same_document_causal(b, h, q, kv):
        return ((doc_ids[b, q] == doc_ids[b, kv]) & (doc_ids[b, q] >= 0) & (kv <= q)) | (q == kv)

    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device)


class KVCache:
    """Per layer, the keys (after QK-norm and RoPE) and values [B, H, T, dh] of the positions seen so far, and, once a
    forward passed `doc_ids`, the document id of every cached position ([B, T]; -1 = padding)."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.doc_ids: torch.Tensor | None = None

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
        out.doc_ids = None if self.doc_ids is None else self.doc_ids.expand(n, -1)
        return out

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A cache of only these rows (a decoder drops the rows that have finished)."""
        out = KVCache()
        out.keys = [k.index_select(0, rows) for k in self.keys]
        out.values = [v.index_select(0, rows) for v in self.values]
        out.doc_ids = None if self.doc_ids is None else self.doc_ids.index_select(0, rows)
        return out


def cached_document_mask(cache: KVCache, doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [B, 1, T, past + T], positions [B, T]) of T new tokens with `doc_ids` [B, T] continuing `cache`, by
    `document_mask`'s rule over the cached and the new positions; the new ids are appended to `cache.doc_ids`.
    Cached positions from forwards without doc ids count as document 0. This is what lets a decoder left-pad prompts
    of different lengths (padding = -1): each row gets the positions and the attention it would have alone."""
    B, T = doc_ids.shape
    past = cache.length
    if cache.doc_ids is None:
        cache.doc_ids = torch.zeros(B, past, dtype=torch.long, device=doc_ids.device)
    all_docs = torch.cat([cache.doc_ids, doc_ids.to(torch.long)], dim=1)             # [B, past + T]
    q_idx = torch.arange(past, past + T, device=doc_ids.device)
    k_idx = torch.arange(past + T, device=doc_ids.device)
    causal = k_idx[None, :] <= q_idx[:, None]                                        # [T, past + T]
    same = (doc_ids[:, :, None] == all_docs[:, None, :]) & (doc_ids[:, :, None] >= 0)
    mask = (same & causal) | (k_idx[None, :] == q_idx[:, None])
    cache.doc_ids = all_docs
    return mask.unsqueeze(1), document_positions(all_docs)[:, past:]


class Attention(nn.Module):
    def __init__(self, cfg: OpenLMConfig):
        super().__init__()
        inner = cfg.n_heads * cfg.head_dim
        self.n_heads, self.head_dim, self.inner = cfg.n_heads, cfg.head_dim, inner
        # q, k and v in one matmul: rows [0, inner) are q, then k, then v (the old q_proj/k_proj/v_proj stacked)
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.d_model, bias=False)
        # QK-norm over the full projection width (OpenLM style), not per head
        self.q_norm: nn.Module = RMSNorm(inner, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm: nn.Module = RMSNorm(inner, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.register_load_state_dict_pre_hook(_stack_legacy("qkv", ("q_proj", "k_proj", "v_proj")))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, H*dh] -> [B, H, T, dh]
        B, T, _ = t.shape
        return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Any,
                memory: MemoryContext | None, layer: int, cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.qkv(h).split(self.inner, dim=-1)
        if memory is not None:
            q, k, v = (_plus(t, memory.delta(site, layer, h))
                       for t, site in ((q, "attn_q"), (k, "attn_k"), (v, "attn_v")))
        q, k, v = self._heads(self.q_norm(q)), self._heads(self.k_norm(k)), self._heads(v)
        q_pre_rope = q
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # lets CUDA pick flash attention
        elif isinstance(mask, torch.Tensor):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            from torch.nn.attention.flex_attention import flex_attention

            # contiguous heads: inductor's flex lowering mis-reads (CPU, torch 2.13) or rejects permuted views of
            # fused producers; one copy per tensor, which inductor folds into the producer's kernel
            out = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=mask)
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
        self.ffn_dim = cfg.ffn_dim
        self.w12 = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)  # gate (rows [0, ffn_dim)) and up, one matmul
        self.w3 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)       # down
        self.register_load_state_dict_pre_hook(_stack_legacy("w12", ("w1", "w2")))

    def forward(self, x: torch.Tensor, memory: MemoryContext | None = None, layer: int = 0) -> torch.Tensor:
        gate, up = self.w12(x).split(self.ffn_dim, dim=-1)
        if memory is None:
            return self.w3(F.silu(gate) * up)
        gate = _plus(gate, memory.delta("ffn_gate", layer, x))
        up = _plus(up, memory.delta("ffn_up", layer, x))
        hidden = F.silu(gate) * up
        return _plus(self.w3(hidden), memory.delta("ffn_down", layer, hidden))


def _stack_legacy(fused: str, parts: tuple[str, ...]) -> Callable[..., None]:
    """A load_state_dict pre-hook: weights saved before the fusion (separate `parts`) load into `fused`, stacked."""

    def hook(module: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
        keys = [f"{prefix}{p}.weight" for p in parts]
        if all(k in state_dict for k in keys) and f"{prefix}{fused}.weight" not in state_dict:
            state_dict[f"{prefix}{fused}.weight"] = torch.cat([state_dict.pop(k) for k in keys], dim=0)

    return hook


class Block(nn.Module):
    def __init__(self, cfg: OpenLMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: Any,
                memory: MemoryContext | None, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, memory, self.layer, cache)
        h = self.ffn_norm(x)
        if memory is not None:
            # one cast of the FFN input for the anchor's and the memory's matmuls: under autocast each matmul would
            # cast h itself and cast its gradient back (4 more [B, T, d] copies per layer with an FFN memory: ~12 ms
            # per step at 160M, batch 16, H100). Their gradients then meet in bf16 before the one cast back.
            h = h.to(compute_dtype(h))
        out = self.ffn(h, memory, self.layer)
        if memory is not None:
            out = _plus(out, memory.delta("ffn", self.layer, h))
        return x + out


def _plus(t: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    return t if delta is None else t + delta


class OpenLMAnchor(nn.Module):
    """The anchor LM. forward(input_ids [B,T], *, memory=None, doc_ids=None, cache=None) -> logits [B,T,V]."""

    concurrent_forward = True   # memory and cache come as arguments: two threads may run forward at once
    cache_doc_ids = True        # forward(..., doc_ids=, cache=): prompts of different lengths decode left-padded

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
        # packed documents under torch.compile: flex attention (True) or SDPA with a dense mask (False, to compare)
        self.flex_attention = True
        cos, sin = rope_tables(torch.arange(ROPE_TABLE_POSITIONS), config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # not in checkpoints: a function of the config
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    Options = OpenLMOptions

    @classmethod
    def from_config(cls, cfg: AnchorConfig, *, vocab_size: int,
                    options: OpenLMOptions | None = None) -> "OpenLMAnchor":
        """Preset `options.preset`, then every non-None field of `options` overrides it."""
        options = options or OpenLMOptions()
        kwargs = {**PRESETS[options.preset], **options.overrides()}
        kwargs["vocab_size"] = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
        try:
            config = OpenLMConfig(**kwargs)
        except ValueError as exc:
            raise ValueError(f"anchor.options (preset {options.preset!r} with overrides): {exc}") from None
        return cls(config)

    def reset_parameters(self) -> None:
        """normal(0, init_std) for matrices; residual output projections scaled by 1/sqrt(2 L) (GPT-2).

        A fused projection is drawn part by part (q, k, v; gate, up) in the order of the separate modules it
        replaced, so a seed gives the same initial weights as before the fusion.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_out = name.endswith("attn.o_proj") or name.endswith("ffn.w3")
                parts = 3 if name.endswith("attn.qkv") else 2 if name.endswith("ffn.w12") else 1
                for part in module.weight.data.chunk(parts, dim=0):
                    nn.init.normal_(part, mean=0.0, std=out_std if is_out else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # lm_head (when untied) was drawn above; when tied it is tok_emb.weight, drawn once more is harmless

    def num_params(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> KVCache:
        """An empty cache for `forward(..., cache=)`."""
        return KVCache()

    def output_weight(self) -> torch.Tensor:
        """The head's weight [V, d]: logits = hidden_states(...) @ output_weight().T (hmlm.loss fuses this)."""
        return self.lm_head.weight

    def hidden_states(self, input_ids: torch.Tensor, *, memory: MemoryContext | None = None,
                      doc_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, d] that the head turns into logits."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        past = 0 if cache is None else cache.length
        mask: Any
        if cache is not None and (doc_ids is not None or cache.doc_ids is not None):
            if doc_ids is None:   # new tokens continue each row's last document (a decoder's next token)
                doc_ids = cache.doc_ids[:, -1:].expand(B, T)
            elif doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} must equal input_ids shape {(B, T)}")
            mask, positions = cached_document_mask(cache, doc_ids.to(input_ids.device))
        elif doc_ids is None:
            # causal over the cached positions and the new ones; None lets SDPA use its own causal kernel
            mask = None if past == 0 else torch.ones(T, past + T, dtype=torch.bool,
                                                     device=input_ids.device).tril(past)
            positions = torch.arange(past, past + T, device=input_ids.device)  # [T]
        else:
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} must equal input_ids shape {(B, T)}")
            doc_ids = doc_ids.to(input_ids.device)
            positions = document_positions(doc_ids)                            # [B, T]
            # flex attention only where it is fused, inside torch.compile (eager flex materialises the scores), and
            # where it has a backward (CUDA; torch's CPU flex attention is forward-only)
            flex = (self.flex_attention and torch.compiler.is_compiling() and _flex_available()
                    and (doc_ids.is_cuda or not torch.is_grad_enabled()))
            mask = document_block_mask(doc_ids) if flex else document_mask(doc_ids)[0]
        x = self.tok_emb(input_ids)
        cos, sin = self._rope(positions, past + T)
        # tables in the dtype q/k will have (bf16 under autocast), rounded once per forward instead of per layer;
        # broadcast over heads: [T, dh] -> [1, 1, T, dh]; [B, T, dh] -> [B, 1, T, dh]
        dtype = compute_dtype(x)
        rope = tuple((c.unsqueeze(-3) if c.dim() == 3 else c[None, None]).to(dtype) for c in (cos, sin))
        for block in self.blocks:
            x = block(x, rope, mask, memory, cache)
        return self.norm(x)

    def _rope(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 cos/sin for `positions` (every one below `end`): rows of the precomputed tables when they reach
        that far and are still float32 (a model cast with .to(bfloat16) casts its buffers too), else computed."""
        if end <= self.rope_cos.shape[0] and self.rope_cos.dtype == torch.float32 and not self.rope_cos.is_meta:
            return self.rope_cos[positions], self.rope_sin[positions]
        return rope_tables(positions, self.config.head_dim, self.config.rope_base)

    def forward(self, input_ids: torch.Tensor, *, memory: MemoryContext | None = None,
                doc_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, memory=memory, doc_ids=doc_ids, cache=cache))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
