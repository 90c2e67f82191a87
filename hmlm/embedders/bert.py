"""A plain BERT encoder for the minilm embedder, loaded from a transformers model folder without transformers.

Why not transformers' BertModel: importing transformers and building the model cost 7-10 s of every `hmlm index`
and `hmlm eval` on a 2-core CPU, for a 22M-parameter encoder whose forward is a dozen ops. Why exactly this op
sequence: an index's routes depend on the embeddings bit for bit, so this module repeats transformers' BertModel
(5.x, its default `sdpa` attention, eval mode) op for op, in the same order and dtypes, and must give the very same
floats in fp32 and under bf16 autocast (tests/test_minilm_bert.py compares the two with torch.equal):
  * embeddings: (word + token_type 0) + position, then LayerNorm (dropout is the identity in eval);
  * the padding mask: None when no row of the batch has padding, else a boolean [B, 1, T, T] (True = attend),
    which is what transformers' create_bidirectional_mask hands to scaled_dot_product_attention;
  * attention: q/k/v Linear, view [B, T, H, D] -> transpose to [B, H, T, D], SDPA with scale D**-0.5, back to
    [B, T, H*D]; then dense, LayerNorm(dense + input);
  * feed-forward: dense, exact GELU, dense, LayerNorm(out + input).
The pooler is not built: sentence vectors are the mean of the last hidden states (hmlm.embedders.minilm).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import EmbedderError

WEIGHTS = "model.safetensors"
# in the folder but not part of the encoder: the pooler (unused by mean pooling) and transformers' position_ids
# buffer (arange, rebuilt here); anything else that is not a parameter of BertEncoder is an error
_IGNORED_PREFIXES = ("pooler.",)
_IGNORED_KEYS = frozenset({"embeddings.position_ids"})


@dataclass(frozen=True)
class BertConfig:
    """The config.json fields the encoder needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_file(cls, path: Path) -> "BertConfig":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EmbedderError(f"{path}: cannot read the model config ({exc})") from None
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu" \
                or raw.get("position_embedding_type", "absolute") != "absolute" or raw.get("is_decoder", False):
            raise EmbedderError(f"{path}: not a BERT encoder with exact GELU and absolute positions "
                                f"(model_type={raw.get('model_type')!r}, hidden_act={raw.get('hidden_act')!r})")
        try:
            cfg = cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except KeyError as exc:
            raise EmbedderError(f"{path}: missing key {exc.args[0]!r}") from None
        if cfg.hidden_size % cfg.num_attention_heads:
            raise EmbedderError(f"{path}: hidden_size {cfg.hidden_size} is not a multiple of "
                                f"num_attention_heads {cfg.num_attention_heads}")
        return cfg


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)   # [1, T], like transformers' buffer
        token_types = torch.zeros_like(input_ids)
        # transformers' order of additions: (word + token_type) + position
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_types)
        x = x + self.position_embeddings(positions)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t = x.shape[:2]
        q = self.query(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=self.head_dim ** -0.5,
                                             is_causal=False)
        return out.transpose(1, 2).contiguous().reshape(b, t, -1)


class BertResidualOutput(nn.Module):
    """dense, then LayerNorm(dense + residual): BertSelfOutput and BertOutput of transformers."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidualOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attended = self.attention(x, mask)
        return self.output(self.intermediate(attended), attended)


class BertStack(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertEncoder(nn.Module):
    """BERT without the pooler; parameter names are transformers' BertModel's, so its safetensors load as they are."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertStack(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, T, hidden] of right-padded `input_ids` [B, T] (attention_mask 1 = token)."""
        x = self.embeddings(input_ids)
        mask = padding_mask(attention_mask)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """transformers' SDPA mask for a bidirectional encoder: None when no row is padded, else a contiguous bool
    [B, 1, T, T], True = attend. Kept exactly so that SDPA gets the same arguments and picks the same kernel (on
    torch 2.13's CPU an all-True mask and None happened to give equal floats; that is not promised elsewhere)."""
    keep = attention_mask.bool()
    if bool(keep.all()):
        return None
    b, t = keep.shape
    return keep[:, None, None, :].expand(b, 1, t, t).contiguous()


def load_encoder(folder: Path) -> BertEncoder:
    """The encoder of a transformers BERT folder (config.json + model.safetensors), weights upcast to fp32.
    Every encoder parameter must be in the file and every tensor of the file must be used (bar the pooler)."""
    from safetensors import SafetensorError, safe_open

    cfg = BertConfig.from_file(folder / "config.json")
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise EmbedderError(f"{weights}: missing (the model folder needs its safetensors weights)")
    # built on the CPU, not on the meta device: meta-tensor init goes through torch._refs, which imports
    # torch._dynamo (2 s); random init of 22M parameters costs a fraction of that, and the weights replace it
    model = BertEncoder(cfg)
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = [n for n in f.keys() if n not in _IGNORED_KEYS and not n.startswith(_IGNORED_PREFIXES)]
            expected = set(model.state_dict())
            missing, unexpected = sorted(expected - set(names)), sorted(set(names) - expected)
            if missing or unexpected:
                raise EmbedderError(f"{weights}: not the weights of this BERT config; missing keys "
                                    f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys "
                                    f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            shapes = model.state_dict()
            wrong = [f"{n} {list(f.get_slice(n).get_shape())} (expected {list(shapes[n].shape)})"
                     for n in names if list(f.get_slice(n).get_shape()) != list(shapes[n].shape)]
            if wrong:
                raise EmbedderError(f"{weights}: tensor shapes do not match config.json: {', '.join(wrong[:3])}")
            state = {n: f.get_tensor(n).float() for n in names}
    except SafetensorError as exc:
        raise EmbedderError(f"{weights}: unreadable safetensors file ({exc})") from None
    model.load_state_dict(state, strict=True)
    return model.eval()
