"""Prototype (not used by training): chunked_ce.linear_cross_entropy with fewer passes over the logits.

chunked_ce today, per chunk of logits (N x V fp32): logsumexp (a reduction), `logits - lse`
(a new N x V tensor), exp (another), the one-hot subtraction, then probs @ W. Here:
log_softmax (one fused kernel, one new tensor), the target's log-prob gathered from it, exp_
in place, the one-hot subtraction, and probs @ W written straight into the gradient buffer.
Same mathematics, same chunking, same interface; bench_train_step.py --prototype_ce patches it
into engines.py for a run, so the figures show what the change buys.
"""
from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device) if need_grad else None
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            t = targets[start:stop]
            logp = torch.log_softmax(torch.nn.functional.linear(hidden[start:stop], weight, bias).float(), dim=-1)
            losses[start:stop] = -logp.gather(1, t.unsqueeze(1)).squeeze(1)
            if need_grad:
                probs = logp.exp_()  # in place: softmax
                probs[torch.arange(len(t), device=t.device), t] -= 1.0
                if probs.dtype == weight.dtype:
                    torch.mm(probs, weight, out=grad[start:stop])
                else:
                    grad[start:stop] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad.to(hidden.dtype) if need_grad else None)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        grad_hidden = None if grad is None else grad * grad_losses.unsqueeze(1).to(grad.dtype)
        return grad_hidden, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Drop-in for chunked_ce.linear_cross_entropy: (N, d) hidden, (N,) targets -> (N,) fp32 losses."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy expects a frozen output layer (requires_grad=False)")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)
