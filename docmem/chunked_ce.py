"""Linear + cross-entropy over the vocabulary without keeping the full logits.

The output layer of a frozen LM is big (Pythia-1B: 2048 x 50304) and needs no gradient. For
N tokens the plain way keeps N x V fp32 logits (and their softmax) alive until backward.
Here the logits are made a chunk of tokens at a time; forward computes each token's loss and,
when the hidden state needs a gradient, the gradient itself, (softmax - onehot) @ W, so
backward only scales it. Peak extra memory: one chunk of logits.

Precision: both products run in the weight's dtype (the hidden state is cast to it: under CUDA
autocast a LayerNorm hands fp32 to a bf16 head), the log-softmax and softmax in that dtype too
(accumulated in fp32 by the kernel; each token's loss is then exact to the dtype's rounding,
2^-9 relative for bf16), and the gradient comes back in the hidden state's dtype. A bf16 copy of an fp32 head makes only these two
products bf16 (--precision bf16_head).
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
            # one fused log_softmax, then the softmax: the fewest passes over N x V numbers. A
            # half-precision head keeps them in its dtype (the kernel accumulates in fp32; on a CPU
            # these passes are bound by memory traffic, and fp32 copies would double it)
            logits = torch.nn.functional.linear(hidden[start:stop].to(weight.dtype), weight, bias)
            logp = torch.log_softmax(logits, dim=-1)
            target_logp = logp.gather(1, t.unsqueeze(1)).squeeze(1)
            losses[start:stop] = -target_logp.float()
            if not need_grad:
                continue
            rows = torch.arange(len(t), device=t.device)
            probs = logp.exp_()  # in place
            if probs.dtype == torch.float32:
                probs[rows, t] -= 1.0
            else:  # p - 1 of the target in fp32 before rounding: it is small once a token is learnt
                probs[rows, t] = (target_logp.float().exp() - 1.0).to(probs.dtype)
            torch.mm(probs, weight, out=grad[start:stop])
        ctx.save_for_backward(grad.to(hidden.dtype) if need_grad else None)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        grad_hidden = None
        if grad is not None:
            grad_hidden = grad * grad_losses.unsqueeze(1).to(grad.dtype)
        return grad_hidden, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Per-token cross-entropy of softmax(hidden @ weight.T + bias) against targets.

    hidden: (N, d), targets: (N,) -> (N,) fp32 losses. Gradients flow to `hidden` only: the
    output layer is frozen."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy expects a frozen output layer (requires_grad=False)")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size)
