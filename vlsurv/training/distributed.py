"""Global-batch tensors for losses that couple samples (Cox risk sets, dispersion pairs) under data
parallelism.

``gather_with_grad(x)``: (n_local, ...) on each process -> (n_global, ...) in rank order, equal on every
process; the process's own slice is its local tensor (autograd flows through it), the other slices are
detached copies. Local sizes may differ between processes (the plan's last batch), so tensors are padded to
the largest size for ``all_gather`` and trimmed afterwards.

Why the loss is scaled by the world size: each process computes the *global* loss L but only its own samples
carry gradient, so process p gets dL/dtheta restricted to its samples, and these parts sum to dL/dtheta. DDP
(and FSDP / ZeRO) *average* gradients over the P processes, so each process backpropagates P * L to end with
exactly dL/dtheta. A per-token mean such as L_LM is written as sum_p (local token loss sum / global token
count), which falls under the same rule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import PartialState


def world() -> tuple[int, int]:
    """(rank, world size) as accelerate sees them: (0, 1) in a single process."""
    state = PartialState()
    return state.process_index, state.num_processes


def all_sizes(n_local: int, device: torch.device) -> list[int]:
    """The local first-dimension size of every process."""
    _, size = world()
    if size == 1:
        return [n_local]
    local = torch.tensor([n_local], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(size)]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


def gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """(n_local, ...) -> (sum of sizes, ...); gradient flows through this process's slice only."""
    rank, size = world()
    if size == 1:
        return x
    sizes = sizes if sizes is not None else all_sizes(x.shape[0], x.device)
    longest = max(sizes)
    padded = x.detach().new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    pieces = [x if p == rank else parts[p][: sizes[p]] for p in range(size)]
    return torch.cat(pieces, dim=0)


def global_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a detached tensor over processes (for counts and logged totals)."""
    value = value.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
