"""Linear + cross-entropy over the vocabulary without keeping the full logits.

The output layer of a frozen LM is big (Pythia-1B: 2048 x 50304) and needs no gradient. For
N tokens the plain way keeps N x V fp32 logits (and their softmax) alive until backward.
Here the logits are made a chunk of tokens at a time; forward computes each token's loss and,
when the hidden state needs a gradient, the gradient itself, (softmax - onehot) @ W, so
backward only scales it. Peak extra memory: one chunk of logits.

Precision: both products run in the weight's dtype (the hidden state is cast to it: under CUDA
autocast a LayerNorm hands fp32 to a bf16 head), the log-softmax in fp32, and the gradient
comes back in the hidden state's dtype. A bf16 copy of an fp32 head makes only these two
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
            # one fused log_softmax (reading the logits in their dtype, answering fp32), then the
            # softmax: the fewest passes over N x V numbers
            logits = torch.nn.functional.linear(hidden[start:stop].to(weight.dtype), weight, bias)
            logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
            losses[start:stop] = -logp.gather(1, t.unsqueeze(1)).squeeze(1)
            if not need_grad:
                continue
            rows = torch.arange(len(t), device=t.device)
            if weight.dtype == torch.float32:
                probs = logp.exp_()  # in place
                probs[rows, t] -= 1.0
                torch.mm(probs, weight, out=grad[start:stop])
            else:  # exp and the cast in one pass; p - 1 of the target computed in fp32 before rounding
                probs = torch.exp(logp, out=torch.empty(logp.shape, dtype=weight.dtype, device=logp.device))
                probs[rows, t] = (logp[rows, t].exp() - 1.0).to(weight.dtype)
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
