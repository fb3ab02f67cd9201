"""Plain linear layers as the fused node (methods/fused_lora.py, ``fuse_linear``) and the nodes'
weights, cast again in the backward pass instead of kept as copies."""

import pickle

import torch
from conftest import small_decoder
from torch import nn
from transformers import LlamaForCausalLM

from tunesmith.methods import build_method, method_config
from tunesmith.methods.fused_lora import FusedLinear, fuse_linear
from tunesmith.methods.fused_mlp import FusedSwiGLU, fuse_swiglu

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def small_llama() -> LlamaForCausalLM:
    return small_decoder(LlamaForCausalLM, attention_bias=True)


def grads_of(layer: nn.Linear, x: torch.Tensor, upstream: torch.Tensor, fused: bool) -> list:
    layer.zero_grad()
    x.grad = None
    with torch.autocast(**BF16):
        y = layer(x) if fused else nn.Linear.forward(layer, x)
    assert ("FusedLinear" in str(y.grad_fn.next_functions)) == fused
    y.backward(upstream)
    return [y, x.grad, layer.weight.grad, layer.bias.grad]


def test_plain_linear_node_equals_autocast_linear():
    """Under bf16 autocast a trainable ``nn.Linear`` run as the node gives autocast's output and
    the same input, weight and bias gradients (the same bf16 products), in the same dtypes."""
    torch.manual_seed(0)
    layer = nn.Linear(24, 16)
    assert fuse_linear(layer) == 1
    x = torch.randn(3, 5, 24, requires_grad=True)
    upstream = torch.randn(3, 5, 16).bfloat16()
    ref = grads_of(layer, x, upstream, fused=False)
    got = grads_of(layer, x, upstream, fused=True)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plain_linear_node_passes_gradcheck():
    """In float64 (no cast) the node's maths: ``y = x W^T + b``, with every gradient."""
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64, "requires_grad": True}
    x, w, b = torch.randn(4, 5, **f64), torch.randn(3, 5, **f64), torch.randn(3, **f64)

    def fn(x, w, b):
        return FusedLinear.apply(x, None, None, w, b, None, None, 1.0, torch.float64)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_full_fine_tuning_shares_the_attention_input_cast_and_keeps_no_weight_copies():
    """Full fine-tuning under autocast: q, k and v keep one bf16 copy of their input, no node
    keeps a bf16 copy of a weight, and the model's loss and gradients are, bit for bit, those of
    the model whose linear layers run module by module."""
    model = small_llama()
    reference = small_llama()
    build_method(method_config("full")).apply(model)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert fuse_linear(model) == linears - 1  # all but the output embedding
    ids = torch.randint(0, 64, (2, 9))
    head = model.get_output_embeddings().weight
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2 and p is not head}
    casts = {id(model): set(), id(reference): set()}
    copies = []
    losses = []
    for m in (model, reference):

        def pack(t, m=m):
            if t.dtype == torch.bfloat16 and tuple(t.shape) == (18, 32):
                casts[id(m)].add(t.untyped_storage().data_ptr())
            if m is model and t.dtype == torch.bfloat16 and tuple(t.shape) in weights:
                copies.append(tuple(t.shape))
            return t

        with torch.autocast(**BF16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    # (N, d) bf16 tensors kept: per layer the attention input (q, k, v), o_proj's input and the
    # MLP input (gate, up), and the head's input: 7, where module by module keeps 13
    assert (len(casts[id(model)]), len(casts[id(reference)])) == (3 * 2 + 1, 6 * 2 + 1)
    assert copies == []
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_lora_and_mlp_nodes_keep_no_weight_copies():
    """LoRA over frozen weights under autocast: the frozen weights are not kept in bf16 between
    forward and backward (the nodes cast them again there)."""
    model = small_llama()
    build_method(method_config("lora", rank=4, alpha=8)).apply(model)
    fuse_swiglu(model)
    weights = {tuple(p.shape) for n, p in model.named_parameters() if "base_layer" in n}
    copies = []

    def pack(t):
        if t.dtype == torch.bfloat16 and tuple(t.shape) in weights:
            copies.append(tuple(t.shape))
        return t

    ids = torch.randint(0, 64, (2, 9))
    with torch.autocast(**BF16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=ids)
    with torch.autocast(**BF16):
        y = model.model.layers[0].mlp(torch.randn(1, 32))
    assert FusedSwiGLU.__name__ in str(y.grad_fn.next_functions)  # the MLP node ran
    assert copies == []
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_plain_linear_falls_back_and_pickles():
    """Without autocast, with input and weight already in bf16, or with a hook on the layer, the
    layer's own forward runs; a model with the node installed pickles."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    fuse_linear(layer)
    x = torch.randn(2, 8)
    assert "Addmm" in layer(x).grad_fn.name()
    with torch.autocast(**BF16):
        assert "FusedLinear" in str(layer(x.bfloat16()).grad_fn.next_functions)  # weight cast
        low = nn.Linear(8, 4).bfloat16()
        fuse_linear(low)
        assert "FusedLinear" not in str(low(x.bfloat16()).grad_fn.next_functions)
        seen = []
        handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        y = layer(x)
        handle.remove()
    assert seen == [torch.bfloat16] and "FusedLinear" not in str(y.grad_fn.next_functions)
    copy = pickle.loads(pickle.dumps(layer))
    with torch.autocast(**BF16):
        torch.testing.assert_close(copy(x), layer(x), rtol=0, atol=0)
