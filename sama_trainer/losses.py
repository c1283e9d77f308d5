"""Per-example losses used by the base and meta objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy against a distribution ``targets`` [B, C]: -Σ_c t_c log softmax(logits)_c."""
    dtype = torch.promote_types(torch.promote_types(logits.dtype, targets.dtype), torch.float32)
    return -(targets.to(dtype) * F.log_softmax(logits.to(dtype), dim=-1)).sum(-1)


def per_example_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy for class ids [B] or soft labels [B, C] (float)."""
    if labels.dim() == logits.dim() and labels.is_floating_point():
        return soft_cross_entropy(logits, labels)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1).long(), reduction="none")
