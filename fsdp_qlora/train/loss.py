"""Next-token loss without ever holding the full fp32 logits.

A 128k-vocabulary model at context 8192 has 8192 x 128256 logits per sequence: 2 GiB in bf16
and 4 GiB in fp32, plus as much again for cross-entropy's saved log-softmax. The chunked loss
runs the model up to the final norm, then projects ``chunk_tokens`` positions at a time through
``lm_head`` and sums their cross-entropy. Each chunk but the last is checkpointed (non-reentrant):
only its slice of hidden states is kept for backward, where its logits are recomputed one chunk at
a time; backward starts with the last chunk, so keeping what it saves costs no more than
recomputing it would. Peak logits memory is therefore one chunk (bf16 + fp32 + its gradient), whatever the
context length.

FSDP2: the root module (embeddings, final norm, lm_head) must still run its forward hooks, so
the model is called as usual with ``lm_head`` swapped for an identity for the duration of the
call: the root's "logits" output is then the final hidden states, on which FSDP2 registers its
pre-backward hook as it would on real logits. The root is not resharded after forward (FSDP2
keeps the root's parameters unsharded until backward ends), so ``lm_head`` holds its
all-gathered weight for the chunks, in forward and in the backward recomputation.

A final logit soft-cap (Gemma 2/3: ``cap * tanh(logits / cap)``, applied by the model's forward
right after lm_head) is switched off in the model's config for the bypassed call and applied to
each chunk of logits here instead; which config key holds it is registry data
(`model/registry.py`), not a branch on the model type.

Numerics: every chunk's logits are the same bf16 matmul rows as the full projection, and the
loss is the same fp32 cross-entropy terms summed in another order; the difference is fp32
summation rounding (relative ~1e-7 per step), not an approximation.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fsdp_qlora.data.packing import model_inputs
from fsdp_qlora.data.sft import IGNORE_INDEX
from fsdp_qlora.model.registry import architecture

# With lm_head bypassed (`final_hidden_states`), the root returns Hugging Face's slice of the
# hidden states, a view, and FSDP2 warns that an in-place op on it would drop its pre-backward
# hook. The loss only slices it and uses out-of-place ops, so the warning is noise.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def full_logits_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: all logits at once, cast to fp32, one cross-entropy."""
    logits = model(**model_inputs(batch)).logits  # packed batches: position_ids, no mask (data/packing.py)
    shifted_logits = logits[:, :-1].float()
    shifted_labels = batch["labels"][:, 1:]
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.size(-1)), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def final_hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, nn.Module]:
    """Run the (FSDP-wrapped) model with lm_head bypassed: (final-norm hidden states, lm_head).
    A final logit soft-cap is switched off for the call (`logit_softcap` gives it to the loss)."""
    lm_head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    key = _softcap_key(model)
    cap = getattr(model.config, key) if key else None
    if key:
        setattr(model.config, key, None)  # the forward would soft-cap the hidden states otherwise
    try:
        hidden = model(**model_inputs(batch)).logits
    finally:
        model.set_output_embeddings(lm_head)
        if key:
            setattr(model.config, key, cap)
    return hidden, lm_head


def logit_softcap(model: nn.Module) -> float | None:
    """The final logit soft-cap the model's forward applies after lm_head (registry data), if any."""
    key = _softcap_key(model)
    return getattr(model.config, key) if key else None


def _softcap_key(model: nn.Module) -> str:
    arch = architecture(getattr(model.config, "model_type", ""))
    return arch.logit_softcap_key if arch and getattr(model.config, arch.logit_softcap_key, None) else ""


def _chunk_loss_sum(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                    softcap: float | None = None) -> torch.Tensor:
    logits = lm_head(hidden)
    if softcap:  # in the logits' dtype, as the model's forward computes it
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int) -> torch.Tensor:
    """Sum of next-token cross-entropies (fp32), `chunk_tokens` positions of logits at a time."""
    softcap = logit_softcap(model)
    hidden, lm_head = final_hidden_states(model, batch)
    hidden = hidden[:, :-1].reshape(-1, hidden.size(-1))
    labels = batch["labels"][:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    starts = range(0, hidden.size(0), chunk_tokens)
    for start in starts:
        stop = start + chunk_tokens
        if start == starts[-1]:
            # The last chunk is not checkpointed: backward begins with it, so what it saves lives no
            # longer than its recomputation would, and the peak is the same one chunk; recomputing
            # it would cost a second lm_head matmul and log-softmax (for a short batch, the only
            # chunk: ~15% of a SmolLM2-135M step on CPU, docs/benchmarks.md).
            total = total + _chunk_loss_sum(lm_head, hidden[start:stop], labels[start:stop], softcap)
        else:
            total = total + checkpoint(_chunk_loss_sum, lm_head, hidden[start:stop], labels[start:stop], softcap,
                                       use_reentrant=False)
    return total


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 0) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions (fp32).

    chunk_tokens > 0: chunked and recomputed (see the module docstring); 0: full logits.
    """
    if chunk_tokens > 0:
        return chunked_loss_sum(model, batch, chunk_tokens)
    return full_logits_loss_sum(model, batch)
