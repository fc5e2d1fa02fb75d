"""Losses: per-group means, Group-DRO's online group weights, supervised contrastive loss."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from raybias.config import SUPCON_ANCHORS


def group_sums(per_sample: torch.Tensor, groups: torch.Tensor, n_groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of `per_sample` per group, count per group); keeps the autograd graph of the sums."""
    sums = torch.zeros(n_groups, dtype=per_sample.dtype, device=per_sample.device)
    sums = sums.index_add(0, groups, per_sample)
    counts = torch.bincount(groups, minlength=n_groups).to(per_sample.dtype)
    return sums, counts


def group_means(per_sample: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of `per_sample` per group; 0 for a group absent from the batch (as the reference)."""
    sums, counts = group_sums(per_sample, groups, n_groups)
    return sums / counts.clamp(min=1)


class GroupDRO:
    """Sagawa et al.'s online Group-DRO.

    Per batch, with ell_g the mean loss of group g (0 if absent) and n_g the number of
    training examples of g:  q_g <- q_g * exp(eta * (ell_g + C / sqrt(n_g))), q <- q / sum(q),
    and the loss is sum_g q_g ell_g (with the updated q, as the reference code does).
    Groups with no training examples get no adjustment (C / sqrt(0) would be infinite).

    Across DDP workers the group sums and counts are all-reduced first, so every worker
    holds the same q and the gradients average to those of the global batch.
    """

    def __init__(self, n_groups: int, eta: float, c: float = 0.0,
                 train_counts: Optional[Sequence[float]] = None):
        self.n_groups = n_groups
        self.eta = float(eta)
        self.q = torch.full((n_groups,), 1.0 / n_groups, dtype=torch.float64)
        counts = torch.as_tensor(train_counts if train_counts is not None else [0] * n_groups,
                                 dtype=torch.float64)
        self.adjustment = torch.where(counts > 0, float(c) / counts.clamp(min=1).sqrt(),
                                      torch.zeros_like(counts))

    def loss(self, per_sample: torch.Tensor, groups: torch.Tensor, world_size: int = 1) -> torch.Tensor:
        sums, counts = group_sums(per_sample, groups, self.n_groups)
        if world_size > 1:
            import torch.distributed as dist

            global_sums = sums.detach().clone()
            global_counts = counts.clone()
            dist.all_reduce(global_sums)
            dist.all_reduce(global_counts)
        else:
            global_sums, global_counts = sums.detach(), counts
        ell = (global_sums / global_counts.clamp(min=1)).to(torch.float64).cpu()
        self.q = self.q * torch.exp(self.eta * (ell + self.adjustment))
        self.q = self.q / self.q.sum()
        q = self.q.to(per_sample.dtype).to(per_sample.device)
        # DDP averages gradients over workers, hence the factor world_size on local sums
        return world_size * (q * sums / global_counts.clamp(min=1)).sum()

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"q": self.q.clone()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.q = state["q"].clone().to(torch.float64)


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float,
                base_temperature: Optional[float] = None, anchors: str = "all") -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., the L_out form) on one view per example.

    z = features / |features|; for an anchor i with positives P(i) = {p != i : y_p = y_i},
        l_i = -(t / t_b) * 1/|P(i)| * sum_{p in P(i)} log( exp(z_i.z_p / t) / sum_{a != i} exp(z_i.z_a / t) )
    with t = `temperature` and t_b = `base_temperature` (None: t, i.e. no rescaling).
    `anchors`: "all" averages l_i over every anchor of the batch, an anchor without a positive
    contributing 0 (HobbitLong/SupContrast's SupConLoss, whose factor t / t_b has t_b = 0.07 by
    default); "with_positive" averages over the anchors that have a positive only (0 if none
    has; raybias before it followed the reference).
    """
    if anchors not in SUPCON_ANCHORS:
        raise ValueError(f"anchors must be one of {SUPCON_ANCHORS}, not {anchors!r}")
    z = F.normalize(features, dim=1)
    n = z.shape[0]
    sim = z @ z.t() / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        return features.sum() * 0.0
    scale = 1.0 if base_temperature is None else float(temperature) / float(base_temperature)
    pos_log_prob = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    per_anchor = -scale * pos_log_prob / n_pos.clamp(min=1)
    if anchors == "with_positive":
        return per_anchor[has_pos].mean()
    return per_anchor.mean()
