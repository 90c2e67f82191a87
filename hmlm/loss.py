"""The language-modelling loss that training, `hmlm bench train` and held-out perplexity share.

`lm_nll` returns Σ_i w_i · NLL_i over the tokens of a batch for per-token weights w (0 at ignored labels), so one
function serves the training mean (w = 1/count), the mean of per-rank means of a one-process subtree run (w =
1/(ranks · count of the token's rank)) and an evaluation sum (w = 1).

For an anchor that exposes `hidden_states` and `output_weight` (the openlm anchor) the head is fused with the loss:
`linear_cross_entropy` walks the tokens in chunks, computes each chunk's logits in the compute dtype, its
log-softmax in float32 and, when gradients are needed, the chunk's gradients right away (the loss is linear in the
per-token NLL, so dloss/dlogits = w·(softmax − onehot) is known in the forward pass). Float32 logits are never
materialised for the whole batch: peak extra memory is one chunk of logits instead of [B·T, V] in bf16 plus its
float32 copy, its log-softmax and their gradients. Other anchors (hf) go through their logits.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .protocols import compute_dtype

IGNORE_INDEX = -100
# float32 log-probability elements per chunk. GPU: 2^26 = 256 MiB (1,280 tokens of a 50k vocabulary), big enough for
# full-speed matmuls, small next to the [B·T, V] logits it replaces. CPU: 2^20 = 4 MiB (256 tokens of a 4k
# vocabulary), which stays in cache and below glibc's mmap threshold: larger chunks were mapped and page-faulted
# afresh every step (a third of the loss's CPU time on the quickstart). Chunks of more than 128 rows are whole
# multiples of 128, so the head's matmuls keep tensor-core friendly shapes.
CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 20}


def token_weights(labels: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Weights [B, T] whose weighted NLL sum is the mean NLL over the non-ignored labels.

    With groups > 1 the batch splits along its first axis into `groups` equal parts (labels.chunk) and the result
    is the mean of the parts' means: a one-process run reproducing that many data-parallel ranks.
    """
    valid = (labels != IGNORE_INDEX).float()
    parts = valid.chunk(groups)
    return torch.cat([p / (p.sum().clamp(min=1.0) * len(parts)) for p in parts])


def _chunk_rows(n: int, vocab: int, device: torch.device) -> int:
    rows = max(1, (CHUNK_ELEMENTS.get(device.type) or CHUNK_ELEMENTS["cuda"]) // max(vocab, 1))
    if rows > 128:
        rows -= rows % 128
    return min(n, rows)


def _chunk_log_probs(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 log-probabilities [n, V], NLL [n]) of one chunk; ignored labels read column 0 (their weight is 0)."""
    logp = torch.log_softmax(h @ w.t(), dim=-1, dtype=torch.float32)
    return logp, -logp.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ w_i · CE(h_i · Wᵀ, y_i), gradients computed chunk by chunk in the forward pass.

    Per chunk: dloss/dlogits = w ⊙ (softmax − onehot). The row weights w commute with the head's matmuls, so they
    are applied to the small sides (dh = w ⊙ (G·W), dW = Gᵀ·(w ⊙ h)) and G = softmax − onehot is written once, in the
    compute dtype, straight from the float32 log-probabilities.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(hidden)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        compiling = torch.compiler.is_compiling()
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            rows = _chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
            for start in range(0, hidden.shape[0], rows):
                stop = min(start + rows, hidden.shape[0])
                h = hidden[start:stop].to(dtype)
                lab, wt = labels[start:stop], weights[start:stop]
                logp, nll = _chunk_log_probs(h, w, lab)
                loss = loss + (nll * wt).sum()
                if need_h or need_w:
                    if compiling:   # inductor fuses exp + cast; eager writes the cast result in one kernel
                        grad = logp.exp().to(dtype)
                    else:
                        grad = torch.exp(logp, out=torch.empty(logp.shape, dtype=dtype, device=logp.device))
                    del logp
                    grad.scatter_add_(1, lab.clamp(min=0).unsqueeze(1),
                                      torch.full((stop - start, 1), -1.0, dtype=dtype, device=grad.device))
                    if need_h:
                        grad_h[start:stop] = ((grad @ w).float() * wt.unsqueeze(1)).to(hidden.dtype)
                    if need_w:
                        grad_w += (grad.t() @ (h.float() * wt.unsqueeze(1)).to(dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """Σ_i weights_i · CE(hidden_i · weightᵀ, labels_i) for hidden [N, d], weight [V, d], labels/weights [N]."""
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    labels = labels.to(hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, weights)
    return (linear_token_nll(hidden, weight, labels) * weights).sum()


def linear_token_nll(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float32 NLL [N] of each label under the head (no gradients), chunk by chunk; ignored labels read column 0
    (their NLL is meaningless: weight or mask them out)."""
    labels = labels.to(hidden.device)
    dtype = compute_dtype(hidden)
    w = weight.to(dtype)
    rows = _chunk_rows(hidden.shape[0], weight.shape[0], hidden.device)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        out[start:start + rows] = _chunk_log_probs(hidden[start:start + rows].to(dtype), w,
                                                   labels[start:start + rows])[1]
    return out


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The unfused form of `linear_cross_entropy` for ready logits [..., V]."""
    nll = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return (nll * weights.flatten().to(nll.dtype)).sum()


def has_fused_head(anchor: torch.nn.Module) -> bool:
    """Whether the anchor exposes `hidden_states` and `output_weight`, so that logits are needed only where used."""
    return hasattr(anchor, "hidden_states") and hasattr(anchor, "output_weight")


def lm_nll(anchor: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *,
           memory: Any = None, doc_ids: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
    """Σ weights · NLL of `labels` under `anchor` (with `memory`, a MemoryContext or None); see the module docstring."""
    if fused and has_fused_head(anchor):
        hidden = anchor.hidden_states(input_ids, memory=memory, doc_ids=doc_ids)
        return linear_cross_entropy(hidden.flatten(0, 1), anchor.output_weight(), labels.flatten(), weights.flatten())
    return weighted_cross_entropy(anchor(input_ids, memory=memory, doc_ids=doc_ids), labels, weights)


@torch.no_grad()
def lm_token_nll(anchor: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, memory: Any = None,
                 doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """float32 NLL [B, T] of each label under `anchor`, 0 at ignored labels, for evaluation (no gradients): the
    fused head and chunked log-softmax of `lm_nll` where the anchor offers them, so per-row or per-group sums
    (held-out perplexity per leaf) never materialise the batch's logits."""
    if has_fused_head(anchor):
        hidden = anchor.hidden_states(input_ids, memory=memory, doc_ids=doc_ids)
        nll = linear_token_nll(hidden.flatten(0, 1), anchor.output_weight(), labels.flatten()).view(labels.shape)
    else:
        logits = anchor(input_ids, memory=memory, doc_ids=doc_ids)
        nll = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten().to(logits.device),
                              ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
    return nll.masked_fill(labels.to(nll.device) == IGNORE_INDEX, 0.0)
