"""nn.Modules holding 4-bit weights: the experts replacement and a dense linear."""

from __future__ import annotations

import torch
from torch import nn

from dgemma.kernels import moe_w4a16, w4a16_matmul
from dgemma.kernels.packed import QuantizedWeight
from dgemma.quant.formats import quantize, stack_weights


class Packed4bit(nn.Module):
    """Buffers of one QuantizedWeight.

    Everything is stored as integer tensors (scales and global scales are bit views)
    because `model.to(torch.bfloat16)` casts every floating buffer, float8 included,
    and would silently destroy the scales. The format follows from the scale storage:
    uint8 bits are E4M3 (nvfp4), int32 bits are fp32 (nf4).
    """

    def __init__(self, q: QuantizedWeight) -> None:
        super().__init__()
        self.register_buffer("packed", q.packed.contiguous())
        if q.fmt == "nvfp4":
            bits = q.scales.to(torch.float8_e4m3fn).contiguous().view(torch.uint8)
        else:
            bits = q.scales.float().contiguous().view(torch.int32)
        self.register_buffer("block_scale", bits)
        self.register_buffer("global_scale", q.global_scale.float().contiguous().view(torch.int32))

    @property
    def fmt(self) -> str:
        return "nvfp4" if self.block_scale.dtype == torch.uint8 else "nf4"

    @property
    def weight(self) -> QuantizedWeight:
        fmt = self.fmt
        scales = self.block_scale.view(torch.float8_e4m3fn if fmt == "nvfp4" else torch.float32)
        return QuantizedWeight(fmt, self.packed, scales, self.global_scale.view(torch.float32))

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, shape={tuple(self.weight.shape)}"


class QuantizedExperts(nn.Module):
    """Drop-in for DiffusionGemmaTextExperts with 4-bit gate_up [E, 2I, H] and down [E, H, I].

    Same forward contract: (hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H].
    """

    def __init__(
        self, gate_up: QuantizedWeight, down: QuantizedWeight, act_fn: nn.Module, activation: str
    ) -> None:
        super().__init__()
        e, two_i, h = gate_up.shape
        if down.shape != (e, h, two_i // 2):
            raise ValueError(f"down_proj shape {down.shape} does not match gate_up_proj {gate_up.shape}")
        self.num_experts = e
        self.hidden_dim = h
        self.intermediate_dim = two_i // 2
        self.gate_up_q = Packed4bit(gate_up)
        self.down_q = Packed4bit(down)
        self.act_fn = act_fn
        self.activation = activation

    @classmethod
    def from_experts(cls, experts: nn.Module, fmt: str = "nvfp4") -> "QuantizedExperts":
        """Quantize a DiffusionGemmaTextExperts module (one expert at a time, to bound memory)."""
        gate_up = stack_weights([quantize(experts.gate_up_proj[e], fmt) for e in range(experts.num_experts)])
        down = stack_weights([quantize(experts.down_proj[e], fmt) for e in range(experts.num_experts)])
        activation = getattr(experts.config, "hidden_activation", "gelu_pytorch_tanh")
        return cls(gate_up, down, experts.act_fn, activation)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return moe_w4a16(
            hidden_states, top_k_index, top_k_weights,
            self.gate_up_q.weight, self.down_q.weight, self.act_fn, self.activation,
        )

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) as dense tensors, for reference checks."""
        return self.gate_up_q.weight.dequantize(dtype), self.down_q.weight.dequantize(dtype)


class QuantLinear(nn.Module):
    """Bias-optional linear over a 4-bit weight [N, K] (NVFP4 layers of pre-quantized checkpoints)."""

    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.qweight = Packed4bit(q)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "nvfp4") -> "QuantLinear":
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(quantize(linear.weight, fmt), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = w4a16_matmul(x, self.qweight.weight)
        return y + self.bias.to(y.dtype) if self.bias is not None else y
