"""The one-node SwiGLU MLP (methods/fused_mlp.py) against the module-by-module MLP, with LoRA on
its projections and plain (trainable or frozen)."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from tunesmith.methods import build_method, method_config
from tunesmith.methods.fused_mlp import FusedSwiGLU, fuse_swiglu, is_swiglu


def lora_llama(mlp_bias=False, dtype=torch.float64, method="lora", **kw):
    """A two-layer Llama with LoRA on every linear layer and random (non-zero) B matrices (or
    another method), its MLPs fused."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=mlp_bias,
    )
    model = LlamaForCausalLM(cfg)
    if method == "lora":
        kw = {"rank": 4, "alpha": 8, **kw}
    method = build_method(method_config(method, **kw))
    method.apply(model)
    model.to(dtype)
    with torch.no_grad():
        for layer in getattr(method, "layers", {}).values():
            layer.lora_B.weight.normal_(0, 0.3)
    assert fuse_swiglu(model) == 2
    return model, method


def fused_ran(y):
    """Whether the output came out of the fused node (through the reshape outside it)."""
    return "FusedSwiGLU" in y.grad_fn.next_functions[0][0].name()


def mlp_grads(mlp, x, upstream, fused):
    for p in mlp.parameters():
        p.grad = None
    x.grad = None
    y = mlp(x) if fused else type(mlp).forward(mlp, x)
    assert fused_ran(y) == fused
    y.backward(upstream)
    return [y.detach(), x.grad] + [p.grad for p in mlp.parameters() if p.requires_grad]


@pytest.mark.parametrize("mlp_bias", [False, True])
@pytest.mark.parametrize("method", ["lora", "full", "adapter"])
def test_fused_mlp_equals_module_by_module(mlp_bias, method):
    """Same output and the same gradients for the input and every trainable tensor of the MLP
    (float64), with and without biases: LoRA's six matrices over frozen projections, full
    fine-tuning's weights and biases, and frozen plain projections (a method that trains
    elsewhere)."""
    model, _ = lora_llama(mlp_bias=mlp_bias, method=method)
    mlp = model.model.layers[1].mlp
    mlp = getattr(mlp, "base_layer", mlp)  # inside the bottleneck adapter's wrapper
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 24, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(3, 5, 24, dtype=torch.float64, generator=g)
    ref = mlp_grads(mlp, x, upstream, fused=False)
    got = mlp_grads(mlp, x, upstream, fused=True)
    trainable = {"lora": 6, "full": 6 if mlp_bias else 3, "adapter": 0}[method]
    assert len(got) == 2 + trainable
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fused_mlp_passes_gradcheck():
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    d, inner, r = 6, 10, 3
    w = [torch.randn(inner, d, **f64), torch.randn(inner, d, **f64), torch.randn(d, inner, **f64)]
    bias = [torch.randn(inner, **f64), None, torch.randn(d, **f64)]
    x = torch.randn(4, d, **f64, requires_grad=True)
    lora = [
        torch.randn(*shape, **f64, requires_grad=True)
        for shape in [(r, d), (inner, r), (r, d), (inner, r), (r, inner), (d, r)]
    ]

    def mlp(x, ag, bg, au, bu, ad, bd):
        return FusedSwiGLU.apply(
            x, w[0], bias[0], w[1], bias[1], w[2], bias[2], ag, bg, au, bu, ad, bd,
            (2.0, 0.5, 1.5), torch.float64,
        )  # fmt: skip

    assert torch.autograd.gradcheck(mlp, (x, *lora))
    trained = [t.clone().requires_grad_() for t in (*w, bias[0], bias[2])]

    def full(x, wg, wu, wd, bg, bd):
        return FusedSwiGLU.apply(
            x, wg, bg, wu, None, wd, bd, *[None] * 6, (1.0, 1.0, 1.0), torch.float64
        )

    assert torch.autograd.gradcheck(full, (x, *trained))


def test_fused_mlp_under_bf16_autocast():
    """Under autocast the node computes in bf16 and hands float32 LoRA gradients close to the
    module-by-module bf16 computation's."""
    model, _ = lora_llama(dtype=torch.float32)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 7, 24, requires_grad=True)
    upstream = torch.randn(2, 7, 24)
    got = {}
    for fused in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got[fused] = mlp_grads(mlp, x, upstream.bfloat16(), fused)
    for a, b in zip(got[True], got[False]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.02 * b.abs().max())
    assert all(p.dtype == torch.float32 for p in got[True][2:])


def test_fused_mlp_falls_back_where_it_must():
    """LoRA dropout in training, a disabled adapter and a merged model take the module path
    and give what that path gives."""
    model, method = lora_llama(dropout=0.1)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    assert not fused_ran(mlp.train()(x))  # dropout active
    y = mlp.eval()(x)
    assert fused_ran(y)  # no dropout in eval
    torch.testing.assert_close(y, type(mlp).forward(mlp, x))
    with method.disable():
        off = mlp(x)
        assert "FusedSwiGLU" not in str(off.grad_fn)
    method.merge()
    torch.testing.assert_close(mlp(x), y)  # merged weights give the adapted output


def test_only_real_swiglu_mlps_are_fused():
    """An MLP with the same names but another formula is left alone; Llama's are fused."""

    class AddMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(4, 8), nn.Linear(4, 8)
            self.down_proj, self.act_fn = nn.Linear(8, 4), nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    class DropoutMLP(AddMLP):
        def forward(self, x):
            h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
            return self.down_proj(nn.functional.dropout(h, 0.1, self.training))

    assert not is_swiglu(AddMLP())
    assert not is_swiglu(DropoutMLP())  # its dropout is not in the formula
    model, _ = lora_llama()
    assert fuse_swiglu(model) == 2  # both layers, fused before
    odd = AddMLP()
    build_method(method_config("lora", rank=2)).apply(odd)
    assert fuse_swiglu(odd) == 0


def test_every_method_gets_the_fused_mlp_through_apply_method(llama):
    """A run's model (``models.apply_method``, setup and loading alike) has its MLPs fused, for
    any method; a merged LoRA model then runs the plain node."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models import apply_method

    tok = AutoTokenizer.from_pretrained(llama)
    for name in ("lora", "full", "prefix"):
        model = AutoModelForCausalLM.from_pretrained(llama)
        method = build_method(method_config(name))
        apply_method(model, method, "lm", tok)
        mlps = [layer.mlp for layer in model.model.layers]
        assert all(getattr(m.forward, "func", None) is not None for m in mlps)
        x = torch.randn(1, 3, model.config.hidden_size, requires_grad=True)
        assert fused_ran(mlps[0](x))


def test_fused_models_pickle_and_hooks_are_honoured(tmp_path):
    """A fused model survives torch.save / torch.load; a forward hook on a projection (which the
    node would skip) sends the MLP down the module path; extra arguments too."""
    model, _ = lora_llama()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    again = torch.load(path, weights_only=False)
    x = torch.randn(1, 3, 24, dtype=torch.float64)
    torch.testing.assert_close(again.model.layers[0].mlp(x), model.model.layers[0].mlp(x))
    mlp = model.model.layers[0].mlp
    seen = []
    handle = mlp.up_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not fused_ran(mlp(x.requires_grad_()))
    assert seen == [(1, 3, 40)]
    handle.remove()
    assert fused_ran(mlp(x))
