"""`hf` anchor: a Hugging Face transformers causal LM (Llama, Qwen2, Gemma 3, ...) with hmlm memory sites.

The paper's post-hoc experiments (§4, Table 2) add hierarchical memories to frozen open-weight models. This anchor
builds such a model from the recipe alone -- `AutoConfig.for_model(anchor.options.model_type,
**anchor.options.config)` then `AutoModelForCausalLM.from_config` -- so nothing is fetched from a hub, the meta
device works for `--dry-run`, and an exported model directory rebuilds the same architecture from its recipe. Weights
come from `anchor.init_from`, a local checkpoint directory written by `save_pretrained` (see `load_pretrained`).

Memory sites are forward hooks registered once on the standard module names of a decoder layer; the hooks read the
current MemoryContext from `self._memory`, which `forward` sets for the duration of one call. So transformers' code
is not patched and a batch is never split into samples.

    ffn        layer.mlp                  delta(x) added to the MLP output; x = the MLP input (the normed hidden)
    ffn_gate   layer.mlp.gate_proj        added to the gate projection's output; x = the MLP input
    ffn_up     layer.mlp.up_proj          added to the up projection's output; x = the MLP input
    ffn_down   layer.mlp.down_proj        added to the down projection's output; x = the gated hidden [B, T, ffn_dim]
    attn_q     layer.self_attn.q_proj     added to the query projection; x = the attention input (normed hidden)
    attn_k/v   layer.self_attn.k_proj/v_proj   same, only when num_key_value_heads == num_attention_heads (a
                                          memory sizes k/v deltas as n_heads * head_dim wide; grouped-query
                                          attention projects to fewer heads)
    attn_o     layer.self_attn.o_proj     added to the output projection; x = the concatenated head outputs

`attn_kv` (extra key/value slots) is not available: it would need a change inside the attention function. In Gemma 3
the MLP output is normed again (post_feedforward_layernorm) before the residual add, so there the ffn delta is too.

HF attention masks know nothing of packed documents, so `doc_ids` is refused: post-hoc recipes set
`data.doc_mask: false`, as the paper did (its base models were not all trained with per-document attention).

Cached keys and values (`new_cache()`, `forward(..., cache=)`) are transformers' own DynamicCache, wrapped so that it
offers the anchor cache contract of hmlm.anchors.openlm.KVCache: `length` and `repeat(n)`.
"""
from __future__ import annotations

import copy
import inspect
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from hmlm.protocols import AnchorShape, MemoryContext

if TYPE_CHECKING:  # only a type here
    from hmlm.config import AnchorConfig

# site -> the module inside a decoder layer whose output the delta is added to
HF_SITES: dict[str, str] = {
    "ffn": "mlp",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_o": "self_attn.o_proj",
}

# config keys that do not change what the network computes: ignored when a checkpoint's config.json is compared
# with the recipe's (token ids only matter to generation, dtype is set by hmlm's precision, the rest is bookkeeping)
_BOOKKEEPING = {"_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version", "bos_token_id",
                "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "output_hidden_states",
                "output_attentions", "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
                "is_encoder_decoder", "tokenizer_class", "_attn_implementation_autoset", "attn_implementation",
                "_model_name_or_path", "unk_token_id"}   # the last two: GGUF conversions (general.name, tokenizer)



@dataclass
class HFOptions:
    """`anchor.options` of the hf anchor: a transformers model_type (llama, qwen2, gemma3_text, ...) and the keyword
    arguments of its config class (hidden_size, intermediate_size, num_hidden_layers, ...); the model is built from
    these, never downloaded."""

    model_type: Optional[str] = None
    config: dict[str, Any] = field(default_factory=dict)


def _recipe_error(msg: str) -> Exception:
    from hmlm.config import RecipeError  # local: the model stays importable without the recipe machinery

    return RecipeError(msg)


def build_hf_config(model_type: str | None, hf_config: dict[str, Any]) -> Any:
    """The transformers config of `anchor.options.model_type` with `anchor.options.config`; unknown keys are an
    error."""
    from transformers import AutoConfig

    if not model_type:
        raise _recipe_error("anchor.options.model_type: the hf anchor needs a transformers model_type "
                            "(e.g. llama, qwen2, gemma3_text)")
    try:
        default = AutoConfig.for_model(model_type)
        config = AutoConfig.for_model(model_type, **hf_config)
    except ValueError as exc:
        raise _recipe_error(f"anchor.options.model_type={model_type!r} / anchor.options.config: "
                            f"{str(exc).splitlines()[0][:300]}") from None
    # HF configs keep any unknown keyword as an attribute, so a typo would silently do nothing; a key that is neither
    # a parameter of the config class nor an attribute of its default instance is refused. Keys the class consumes
    # and converts (legacy rope_theta -> rope_parameters) never reach to_dict and pass.
    params = set(inspect.signature(type(config).__init__).parameters)
    unknown = sorted(k for k in hf_config if k in config.to_dict() and k not in params and k not in default.to_dict())
    if unknown:
        raise _recipe_error(f"anchor.options.config: unknown key(s) {', '.join(unknown)} for model_type {model_type!r}; "
                            f"known keys: {', '.join(sorted(params - {'self', 'kwargs'}))}")
    return config


class HFCache:
    """A transformers DynamicCache with hmlm's cache contract: `length` and `repeat(n)`."""

    def __init__(self, config: Any):
        from transformers import DynamicCache

        try:
            self.inner = DynamicCache(config=config)   # transformers >= 4.56 sizes sliding-window layers from it
        except TypeError:
            self.inner = DynamicCache()

    @property
    def length(self) -> int:
        return int(self.inner.get_seq_length())

    def repeat(self, n: int) -> "HFCache":
        """n rows continuing this cache's single row (a copy: transformers extends its cache in place)."""
        out = copy.copy(self)
        out.inner = copy.deepcopy(self.inner)
        out.inner.batch_repeat_interleave(n)
        return out


class HFAnchor(nn.Module):
    """forward(input_ids [B,T], *, memory=None, doc_ids=None, cache=None) -> logits [B,T,V]; `self.model` is the HF
    CausalLM."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config                  # hmlm reads anchor.config.vocab_size
        c = model.config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        self.kv_heads = getattr(c, "num_key_value_heads", None) or heads
        self.shape = AnchorShape(n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=heads,
                                 head_dim=head_dim, ffn_dim=c.intermediate_size)
        self._memory: MemoryContext | None = None
        self.sites = self._register_hooks()
        # transformers 5.x renamed forward's `past_key_values` to `cache` (the old name warns, then goes away)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    Options = HFOptions

    @classmethod
    def from_config(cls, cfg: AnchorConfig, *, vocab_size: int, options: HFOptions | None = None) -> "HFAnchor":
        """Build `options.model_type` from `options.config` with random weights (respects torch.device("meta")).

        The vocabulary is options.config's vocab_size (the checkpoint's), else anchor.vocab_size, else the tokenizer's.
        """
        from transformers import AutoModelForCausalLM

        options = options or HFOptions()
        hf_config = dict(options.config)
        model_vocab = hf_config.get("vocab_size")
        if model_vocab is not None and cfg.vocab_size is not None and model_vocab != cfg.vocab_size:
            raise _recipe_error(f"anchor.vocab_size={cfg.vocab_size} differs from anchor.options.config.vocab_size="
                                f"{model_vocab}; set one of them (the model's embedding rows)")
        if model_vocab is None:
            hf_config["vocab_size"] = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
        elif vocab_size > model_vocab:
            raise _recipe_error(f"anchor.options.config.vocab_size={model_vocab} is smaller than the tokenizer's "
                                f"vocabulary ({vocab_size} ids): the model cannot embed every token")
        config = build_hf_config(options.model_type, hf_config)
        # sdpa: fused attention on CUDA, plain maths on CPU, and no optional kernel package (flash-attn) needed
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        return cls(model)

    # ------------------------------------------------------------------ memory sites

    def _register_hooks(self) -> tuple[str, ...]:
        """One forward hook per (layer, site) whose module exists; returns the sites this architecture has."""
        layers = self.model.model.layers
        found: set[str] = set()
        for idx, layer in enumerate(layers):
            for site, path in HF_SITES.items():
                module = layer.get_submodule(path) if _has_submodule(layer, path) else None
                if module is None:
                    continue
                module.register_forward_hook(self._hook(site, idx), with_kwargs=True)
                found.add(site)
        if "ffn" not in found:
            raise ValueError(f"{type(self.model).__name__}: decoder layers have no `mlp` module, so the hf anchor "
                             "cannot attach FFN memories to this architecture")
        return tuple(s for s in HF_SITES if s in found)

    def _hook(self, site: str, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            ctx = self._memory
            if ctx is None:
                return None  # keep the module's output
            x = args[0] if args else next(iter(kwargs.values()))
            delta = ctx.delta(site, layer, x)
            return None if delta is None else output + delta.to(output.dtype)
        return hook

    def _check_memory(self, memory: MemoryContext) -> None:
        wanted = set(memory.memory.sites)
        missing = sorted(wanted - set(self.sites))
        if missing:
            raise ValueError(f"memory sites {', '.join(missing)} are not available on the hf anchor "
                             f"({type(self.model).__name__}); it has {', '.join(self.sites)}")
        if wanted & {"attn_k", "attn_v"} and self.kv_heads != self.shape.n_heads:
            raise ValueError(f"memory sites attn_k/attn_v need num_key_value_heads == num_attention_heads; "
                             f"{type(self.model).__name__} has {self.kv_heads} key/value heads for "
                             f"{self.shape.n_heads} query heads (grouped-query attention)")

    # ------------------------------------------------------------------ weights

    def load_pretrained(self, directory: str | Path) -> None:
        """Copy weights from a local `save_pretrained` directory (config.json + safetensors); never downloads.

        The checkpoint's config must describe the recipe's network: every key that changes the computation is
        compared, and a difference is an error that lists what to copy into anchor.options.config. The recipe stays the
        single source of truth, so an exported model directory rebuilds the same network.
        """
        from transformers import AutoModelForCausalLM

        directory = Path(directory)
        try:
            src = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
        except Exception as exc:  # missing weights, foreign format, unknown model_type
            raise ValueError(f"anchor.init_from: {directory} is not a loadable Hugging Face checkpoint "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); expected a directory "
                             "written by save_pretrained with config.json and model*.safetensors") from None
        ours, theirs = self.model.config.to_dict(), src.config.to_dict()
        diff = sorted(k for k in (set(ours) | set(theirs)) - _BOOKKEEPING if ours.get(k) != theirs.get(k))
        if diff:
            lines = "; ".join(f"{k}: recipe {ours.get(k)!r}, checkpoint {theirs.get(k)!r}" for k in diff)
            raise ValueError(f"anchor.init_from: {directory / 'config.json'} describes another network than "
                             f"anchor.options.model_type/config ({lines}); copy the checkpoint's values into "
                             "anchor.options.config")
        self.model.load_state_dict(src.state_dict(), strict=True)

    # ------------------------------------------------------------------ forward

    def new_cache(self) -> HFCache:
        """An empty cache for `forward(..., cache=)`."""
        return HFCache(self.model.config)

    def forward(self, input_ids: torch.Tensor, *, memory: MemoryContext | None = None,
                doc_ids: torch.Tensor | None = None, cache: HFCache | None = None) -> torch.Tensor:
        if doc_ids is not None:
            raise ValueError("the hf anchor has no per-document attention mask: post-hoc recipes need "
                             "`data.doc_mask: false` (the paper trains post-hoc memories without it)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if memory is not None:
            self._check_memory(memory)
        self._memory = memory
        try:
            if cache is None:
                return self.model(input_ids=input_ids, use_cache=False).logits
            return self.model(input_ids=input_ids, use_cache=True, **{self._cache_arg: cache.inner}).logits
        finally:
            self._memory = None  # a later plain call must not see this batch's memory

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False
