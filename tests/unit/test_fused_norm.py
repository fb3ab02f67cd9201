"""The one-node RMSNorm (methods/fused_norm.py) against the module's own forward."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tunesmith.methods.fused_norm import fuse_rmsnorm, is_rmsnorm


def grads(norm, x, upstream, fused):
    norm.weight.grad = x.grad = None
    y = norm(x) if fused else type(norm).forward(norm, x)
    assert ("FusedRMSNorm" in y.grad_fn.name()) == fused
    y.backward(upstream)
    return y.detach(), x.grad, norm.weight.grad


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-6), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)]
)
def test_fused_rmsnorm_equals_the_module(dtype, tol):
    """Same output and the same gradients for x and the weight, for float64, float32 and bf16
    inputs (the norm computes in float32 whatever the input, as the module does)."""
    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2, generator=g)
    assert fuse_rmsnorm(norm) == 1
    x = torch.randn(3, 4, 16, generator=g).to(dtype).requires_grad_()
    upstream = torch.randn(3, 4, 16, generator=g).to(dtype)
    for a, b in zip(grads(norm, x, upstream, True), grads(norm, x, upstream, False)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("x_dtype", "w_dtype", "tol"),
    [
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 1e-2),  # the module returns float32 here
        (torch.float32, torch.bfloat16, 1e-2),
    ],
)
def test_frozen_weight_and_mixed_dtypes_equal_the_module(x_dtype, w_dtype, tol):
    """LoRA's case: a frozen norm weight, the gradient flowing to x alone; and an input and a
    weight of different dtypes: the same output (and its dtype) and the same input gradient."""
    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(16, eps=1e-5).to(w_dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5, generator=g)
    assert fuse_rmsnorm(norm) == 1
    x = torch.randn(2, 5, 16, generator=g).to(x_dtype).requires_grad_()
    upstream = torch.randn(2, 5, 16, generator=g)
    got = []
    for fused in (True, False):
        x.grad = None
        y = norm(x) if fused else type(norm).forward(norm, x)
        y.backward(upstream.to(y.dtype))
        got.append((y.detach(), x.grad))
    (y_fused, dx_fused), (y_module, dx_module) = got
    assert y_fused.dtype == y_module.dtype and dx_fused.dtype == dx_module.dtype == x_dtype
    torch.testing.assert_close(y_fused, y_module, rtol=tol, atol=tol)
    torch.testing.assert_close(dx_fused, dx_module, rtol=tol, atol=tol)


def test_only_this_rmsnorm_is_fused():
    """Every RMSNorm of a Llama (two per layer and the final one); a (1 + w) variant and a
    LayerNorm keep their forward."""

    class OnePlus(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
            return x * (1.0 + self.weight)

    class Gated(LlamaRMSNorm):  # a norm with a second input (Mamba-style gating)
        def forward(self, x, gate=None):
            y = super().forward(x)
            return y if gate is None else y * torch.sigmoid(gate)

    assert not is_rmsnorm(OnePlus()) and not is_rmsnorm(nn.LayerNorm(8))
    gated = Gated(8)
    assert fuse_rmsnorm(gated) == 1  # one input: the same formula
    x, gate = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(gated(x, gate), Gated.forward(gated, x, gate))  # two: its own
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    assert fuse_rmsnorm(LlamaForCausalLM(cfg)) == 5
