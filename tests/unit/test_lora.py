import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.errors import ConfigError
from tunesmith.methods import build_method, method_config
from tunesmith.methods.lora import LoRALinear


def load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def ids():
    return torch.randint(6, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def lora(model, **kw):
    torch.manual_seed(0)
    method = build_method(method_config("lora", **kw))
    return method.apply(model), method


def randomise(method):
    with torch.no_grad():
        for layer in method.layers.values():
            layer.lora_B.weight.normal_(0, 0.5)


def test_init_equals_base(tiny_model):
    x = ids()
    base = load(tiny_model)(x).logits
    model, _ = lora(load(tiny_model), rank=4)
    assert torch.equal(model(x).logits, base)


def test_only_lora_trains_and_all_linear_skips_head(tiny_model):
    model, method = lora(load(tiny_model), rank=4)
    names = [n for n, _ in method.trainable_parameters()]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert not isinstance(model.get_output_embeddings(), LoRALinear)
    # 2 layers x (q, k, v, o, gate, up, down)
    assert len(method.layers) == 14


def test_targets_by_suffix_and_regex(llama):
    _, m = lora(load(llama), targets=["q_proj", "v_proj"])
    assert sorted({n.rsplit(".", 1)[1] for n in m.layers}) == ["q_proj", "v_proj"]
    _, m = lora(load(llama), targets=r"model\.layers\.0\..*_proj")
    assert all(n.startswith("model.layers.0.") for n in m.layers) and len(m.layers) == 7
    with pytest.raises(ConfigError, match="matches no linear layer; this model has: .*q_proj"):
        lora(load(llama), targets=["query"])


def test_disabled_equals_base_and_merged_equals_unmerged(tiny_model):
    x = ids()
    base = load(tiny_model)(x).logits
    model, method = lora(load(tiny_model), rank=4)
    randomise(method)
    adapted = model(x).logits
    assert not torch.allclose(adapted, base)
    with method.disable():
        assert torch.equal(model(x).logits, base)
    merged = method.merge()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(x).logits, adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter_with_same_logits(tiny_model, tmp_path, rslora):
    from peft import PeftModel

    x = ids()
    model, method = lora(load(tiny_model), rank=4, alpha=8, rslora=rslora)
    randomise(method)
    ours = model(x).logits
    method.save(tmp_path, str(tiny_model))
    peft_model = PeftModel.from_pretrained(load(tiny_model), tmp_path).eval()
    torch.testing.assert_close(peft_model(x).logits, ours, atol=1e-5, rtol=1e-5)


def test_we_load_peft_adapter_with_same_logits(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    x = ids()
    peft_model = get_peft_model(
        load(llama), LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"])
    )
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    expected = peft_model(x).logits
    peft_model.save_pretrained(tmp_path)
    from tunesmith.methods.lora import LoRA

    method = build_method(LoRA.config_from_peft(tmp_path))
    model = method.apply(load(llama))
    method.load(tmp_path)
    torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-5)


def _module_by_module(x, x_lora, weight, bias, a, b, s):
    """The LoRA maths written op by op: x W^T + b + s (x' A^T) B^T."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + (x_lora @ a.t() @ b.t()) * s


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("separate", [False, True])
def test_fused_lora_equals_module_by_module_maths(bias, separate):
    """The one-node LoRA (methods/fused_lora.py) gives the same output and gradients for x, A
    and B as the op-by-op formula, with the LoRA input equal to x or separate (as dropout
    makes it), and passes gradcheck."""
    from tunesmith.methods.fused_lora import fused_linear

    g = torch.Generator().manual_seed(0)
    f64 = {"dtype": torch.float64, "generator": g}
    x = torch.randn(3, 5, 12, **f64).requires_grad_()
    w, b = torch.randn(7, 12, **f64), (torch.randn(7, **f64) if bias else None)
    a = torch.randn(4, 12, **f64).requires_grad_()
    bb = torch.randn(7, 4, **f64).requires_grad_()
    mask = (torch.rand(3, 5, 12, generator=g) > 0.3).double() / 0.7
    upstream = torch.randn(3, 5, 7, **f64)
    got = []
    for fused in (False, True):
        x.grad = a.grad = bb.grad = None
        x_lora = x * mask if separate else x
        if fused:
            y = fused_linear(x, x_lora if separate else None, w, b, a, bb, 2.0)
        else:
            y = _module_by_module(x, x_lora, w, b, a, bb, 2.0)
        y.backward(upstream)
        got.append((y.detach(), x.grad, a.grad, bb.grad))
    for ref, fused in zip(*got):
        torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, a, bb: fused_linear(x, x * mask if separate else None, w, b, a, bb, 2.0),
        (x, a, bb),
    )


def test_fused_lora_under_bf16_autocast_keeps_adapter_grads_fp32():
    """Under autocast the layer computes in bf16 (output bf16) and hands A and B float32
    gradients close to the float32 computation's."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    base.requires_grad_(False)
    layer = LoRALinear(base, rank=8, scaling=2.0, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(4, 10, 64)
    grads = {}
    for bf16 in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(x)
        assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert "FusedLinear" in y.grad_fn.next_functions[0][0].name()  # the fused node ran
        y.float().square().sum().backward()
        grads[bf16] = [layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    for ref, low in zip(grads[False], grads[True]):
        assert low.dtype == torch.float32
        torch.testing.assert_close(low, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


def test_lora_dropout_reaches_only_the_update():
    """With dropout the base product sees x and the update sees dropout(x), drawn once, in the
    output and in every gradient; in eval mode there is no dropout."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8, bias=False)
    base.requires_grad_(False)
    layer = LoRALinear(base, rank=4, scaling=0.5, dropout=0.5).train()
    torch.nn.init.normal_(layer.lora_B.weight)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    x = torch.randn(2, 3, 16, requires_grad=True)
    upstream = torch.randn(2, 3, 8)
    got = []
    for fused in (True, False):
        x.grad = a.grad = b.grad = None
        torch.manual_seed(1)
        if fused:
            y = layer(x)
            assert "FusedLinear" in y.grad_fn.next_functions[0][0].name()
        else:
            y = base(x) + torch.nn.functional.dropout(x, 0.5) @ a.t() @ b.t() * 0.5
        y.backward(upstream)
        got.append((y.detach(), x.grad, a.grad, b.grad))
    for fused, ref in zip(*got):
        torch.testing.assert_close(fused, ref)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + x @ a.t() @ b.t() * 0.5)


def test_gradient_checkpointing_gives_the_same_adapter_gradients(llama):
    """``train.gradient_checkpointing`` recomputes each layer (the fused LoRA node included)
    in the backward pass: same loss and LoRA gradients as storing the activations."""
    x = ids()
    grads = []
    for checkpointing in (False, True):
        model, method = lora(load(llama).train(), rank=4)
        randomise(method)
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model(x, labels=x).loss.backward()
        grads.append([p.grad for _, p in method.trainable_parameters()])
    assert all(g is not None for g in grads[1])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-7)


def test_lora_output_can_be_changed_in_place():
    """Models modify projections in place (activations, rotary, scaling): the fused node's
    output must allow it, as a plain linear layer's does."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    base.requires_grad_(False)
    layer = LoRALinear(base, rank=2, scaling=1.0, dropout=0.0)
    x = torch.randn(2, 3, 8, requires_grad=True)
    y = layer(x)
    y.view(2, 3, 2, 3).transpose(1, 2).mul_(2).relu_()
    y.sum().backward()
    assert x.grad is not None and layer.lora_B.weight.grad is not None


def test_low_precision_base_without_autocast_keeps_the_adapter_in_fp32():
    """Over a bf16 base with no autocast (model.dtype: bfloat16, precision: fp32) the update is
    computed from the adapter's float32 weights, as the module-by-module path always did."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16).to(torch.bfloat16)
    base.requires_grad_(False)
    layer = LoRALinear(base, rank=4, scaling=2.0, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight, std=1e-3)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and "FusedLinear" not in str(y.grad_fn)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    update = (x.float() @ a.t() @ b.t() * 2.0).to(torch.bfloat16)
    torch.testing.assert_close(y, base(x) + update)


def test_layers_reading_one_tensor_share_its_cast():
    """q, k and v read the same input: under autocast their nodes keep one bf16 copy of it, not
    three; a tensor changed in place in between is cast again."""
    torch.manual_seed(0)
    layers = []
    for _ in range(3):
        base = torch.nn.Linear(16, 8, bias=False)
        base.requires_grad_(False)
        layers.append(LoRALinear(base, rank=2, scaling=1.0, dropout=0.0))
    x = torch.randn(2, 5, 16, requires_grad=True)
    casts = set()

    def pack(t):
        if t.dtype == torch.bfloat16 and t.shape == (10, 16):
            casts.add(t.untyped_storage().data_ptr())
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        ys = [layer(x) for layer in layers]
    assert len(casts) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alone = [layer(x.detach().clone()) for layer in layers]
    for y, ref in zip(ys, alone):
        torch.testing.assert_close(y, ref, rtol=0, atol=0)
    sum(y.float().sum() for y in ys).backward()
    assert x.grad is not None
    z = torch.randn(2, 5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = layers[0](z)
        z.mul_(2)
        again = layers[0](z)
    torch.testing.assert_close(again.float(), 2 * first.float(), rtol=0.02, atol=0.02)


def test_lora_under_inference_mode_and_autocast():
    """Inference tensors have no version counter: the shared cast must not need one."""
    base = torch.nn.Linear(8, 4)
    base.requires_grad_(False)
    layer = LoRALinear(base, rank=2, scaling=1.0, dropout=0.0)
    x = torch.randn(3, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    torch.testing.assert_close(y.float(), base(x), rtol=0.02, atol=0.02)
