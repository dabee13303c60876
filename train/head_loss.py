"""Cross-entropy through the tied, soft-capped LM head, a chunk of rows at a time.

The plain path (``lm_head`` -> fp32 -> tanh soft-cap -> ``F.cross_entropy``) materialises a
rows x 8192 fp32 tensor five times over (logits, divided, tanh, scaled, log-softmax) plus
their gradients: on a 2-core CPU that memory traffic was over half of every training step,
twice the matmuls' time. Here each chunk's logits stay cache-sized, and the gradients
are computed in the same sweep (the loss is the end of the graph, so its incoming
gradient is a scalar that backward only has to multiply in), so nothing is recomputed.
"""
from __future__ import annotations

import torch


class _SoftcappedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        h, w = hidden.float(), weight.float()
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(w)
        loss = h.new_zeros(())
        correct = h.new_zeros(())
        for a in range(0, n, chunk):
            hc, yc = h[a:a + chunk], targets[a:a + chunk]
            rows = torch.arange(hc.shape[0], device=h.device)
            t = (hc @ w.T).div_(cap).tanh_()  # soft-capped logits are cap * t
            logits = t * cap
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits[rows, yc]).sum()
            correct += (logits.argmax(-1) == yc).sum()
            # d loss / d logits = softmax - onehot; through the cap: * (1 - t^2)
            g = torch.exp_(logits.sub_(lse[:, None]))
            g[rows, yc] -= 1.0
            g.mul_(t.mul_(t).neg_().add_(1.0))
            grad_h[a:a + chunk] = g @ w
            grad_w.addmm_(g.T, hc)
        ctx.save_for_backward(grad_h.div_(n), grad_w.div_(n))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        accuracy = correct / n
        ctx.mark_non_differentiable(accuracy)
        return loss / n, accuracy

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (grad_h * grad_loss).to(h_dtype), (grad_w * grad_loss).to(w_dtype), None, None, None


def softcapped_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                             chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of ``cap * tanh(hidden @ weight.T / cap)`` against ``targets``, and the
    fraction of rows whose argmax is the target (for logging; not differentiable).

    hidden: (N, D) final-norm hidden states; weight: (V, D) the LM head; targets: (N,).
    """
    if hidden.shape[0] == 0:
        zero = hidden.new_zeros((), dtype=torch.float32) + 0 * hidden.sum() + 0 * weight.sum()
        return zero, zero.detach()
    with torch.autocast(hidden.device.type, enabled=False):  # fp32 logits under bf16 autocast too
        return _SoftcappedCrossEntropy.apply(hidden, weight, targets, cap, chunk)
