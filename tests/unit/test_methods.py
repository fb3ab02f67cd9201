"""One battery every method row runs through (the way PEFT tests its tuners)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tunesmith.errors import TunesmithError
from tunesmith.methods import build_method, method_config, method_names

METHODS = method_names()


def fresh(path, name):
    torch.manual_seed(0)
    method = build_method(method_config(name))
    return method.apply(AutoModelForCausalLM.from_pretrained(path).eval()), method


def perturb(method):
    with torch.no_grad():
        for _, p in method.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_registry_has_core_methods():
    assert {"full", "lora", "adapter"} <= set(METHODS)


@pytest.mark.parametrize("name", ["lora", "adapter"])
def test_identity_at_initialisation(tiny_model, name):
    x = torch.randint(6, 90, (2, 10), generator=torch.Generator().manual_seed(3))
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(x).logits
    model, method = fresh(tiny_model, name)
    assert torch.equal(model(x).logits, base)
    assert method.trainable_parameters()


@pytest.mark.parametrize("placement, per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter_placement(llama, placement, per_layer):
    torch.manual_seed(0)
    method = build_method(method_config("adapter", placement=placement, bottleneck=4))
    method.apply(AutoModelForCausalLM.from_pretrained(llama))
    assert len(method.wrapped) == 2 * per_layer  # two decoder layers
    assert all(n.endswith(("mlp", "self_attn")) for n in method.wrapped)


def test_adapter_cannot_merge(llama):
    _, method = fresh(llama, "adapter")
    with pytest.raises(TunesmithError, match="cannot be folded"):
        method.merge()


@pytest.mark.parametrize("name", METHODS)
def test_save_load_round_trip_same_logits(llama, tmp_path, name):
    x = torch.randint(6, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    model, method = fresh(llama, name)
    perturb(method)
    expected = model(x).logits
    method.save(tmp_path, str(llama))
    again, method2 = fresh(llama, name)
    assert not torch.allclose(again(x).logits, expected)
    method2.load(tmp_path)
    torch.testing.assert_close(again(x).logits, expected)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_and_trainable_only(llama, name):
    model, method = fresh(llama, name)
    perturb(method)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    trainable = {n for n, _ in method.trainable_parameters()}
    assert set(state) == trainable
    other_model, other = fresh(llama, name)
    other.load_state_dict(state)
    for (n, p), (_, q) in zip(model.named_parameters(), other_model.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", METHODS)
def test_disable_is_base_or_refused(llama, name):
    x = torch.randint(6, 100, (1, 8), generator=torch.Generator().manual_seed(2))
    base = AutoModelForCausalLM.from_pretrained(llama).eval()(x).logits
    model, method = fresh(llama, name)
    perturb(method)
    if name == "full":
        with pytest.raises(TunesmithError, match="no frozen base"):
            method.disable()
        return
    with method.disable():
        assert torch.equal(model(x).logits, base)
    assert not torch.equal(model(x).logits, base)
