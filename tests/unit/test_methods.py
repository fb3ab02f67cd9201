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
    assert {"full", "lora", "adapter", "prefix", "prompt"} <= set(METHODS)


@pytest.mark.parametrize("name", ["lora", "adapter"])
def test_identity_at_initialisation(tiny_model, name):
    x = torch.randint(6, 90, (2, 10), generator=torch.Generator().manual_seed(3))
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(x).logits
    model, method = fresh(tiny_model, name)
    assert torch.equal(model(x).logits, base)
    assert method.trainable_parameters()


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_virtual_tokens_change_outputs_and_keep_shape(tiny_model, name):
    """Prefix and prompt tuning are not the identity at initialisation: outputs change, stay
    finite, and keep one position per real token."""
    x = torch.randint(6, 90, (2, 10), generator=torch.Generator().manual_seed(3))
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()(x).logits
    model, method = fresh(tiny_model, name)
    out = model(x).logits
    assert out.shape == base.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, base)


@pytest.mark.parametrize("name", METHODS)
def test_kv_cache_generation_equals_no_cache(tiny_model, name):
    """Greedy generation with the key/value cache gives the tokens a full forward per step gives,
    on a left-padded batch."""
    model, method = fresh(tiny_model, name)
    perturb(method)
    ids = torch.randint(6, 90, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = model.config.pad_token_id, 0
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
        eos_token_id=None,
        min_new_tokens=8,
    )
    with torch.no_grad():
        cached = model.generate(use_cache=True, **kwargs)
        uncached = model.generate(use_cache=False, **kwargs)
    assert cached.shape[1] == 17
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_peft_loads_prompt_learning_artifacts(tiny_model, tmp_path, name):
    """PEFT's PeftModel computes our logits from our prefix / prompt artifact (Llama and Qwen2,
    both with grouped-query attention)."""
    from peft import PeftModel

    x = torch.randint(6, 90, (2, 10), generator=torch.Generator().manual_seed(5))
    model, method = fresh(tiny_model, name)
    perturb(method)
    ours = model(x).logits
    method.save(tmp_path, str(tiny_model))
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    theirs = PeftModel.from_pretrained(base, tmp_path).eval()(input_ids=x).logits
    n = method.config.virtual_tokens
    theirs = theirs[:, n:] if name == "prompt" else theirs  # PEFT returns the prompt's positions
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_prefix_reparameterisation_is_folded_on_save(llama, tmp_path):
    """Training goes through the MLP; the artifact holds its output, and loads without it."""
    model, method = fresh(llama, "prefix")
    assert method.encoder.mlp is not None
    perturb(method)
    x = torch.randint(6, 90, (1, 6), generator=torch.Generator().manual_seed(6))
    expected = model(x).logits
    method.save(tmp_path, str(llama))
    again, other = fresh(llama, "prefix")
    other.load(tmp_path)
    assert other.encoder.mlp is None and other.encoder.prefix is not None
    torch.testing.assert_close(again(x).logits, expected)


def test_prompt_init_from_text(llama):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    method = build_method(method_config("prompt", virtual_tokens=5, init="text", init_text="12+3"))
    model = method.apply(AutoModelForCausalLM.from_pretrained(llama))
    ids = AutoTokenizer.from_pretrained(llama)("12+3", add_special_tokens=False)["input_ids"]
    table = model.get_input_embeddings().weight
    assert torch.equal(method.prompt.weight, table[(ids * 5)[:5]])


@pytest.mark.parametrize("placement, per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter_placement(llama, placement, per_layer):
    torch.manual_seed(0)
    method = build_method(method_config("adapter", placement=placement, bottleneck=4))
    method.apply(AutoModelForCausalLM.from_pretrained(llama))
    assert len(method.wrapped) == 2 * per_layer  # two decoder layers
    assert all(n.endswith(("mlp", "self_attn")) for n in method.wrapped)


@pytest.mark.parametrize("name", ["adapter", "prefix", "prompt"])
def test_unmergeable_methods_say_so(llama, name):
    _, method = fresh(llama, name)
    with pytest.raises(TunesmithError, match=f"method '{name}' .* cannot be"):
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


@pytest.mark.parametrize("name", method_names())
def test_methods_state_what_they_wrap(llama, name):
    """A method's declared wrapped modules are exactly the modules it replaced by wrappers."""
    from tunesmith.methods.base import WRAPPED

    method = build_method(method_config(name))
    model = method.apply(AutoModelForCausalLM.from_pretrained(llama))
    wrappers = sorted(n for n, m in model.named_modules() if hasattr(m, WRAPPED))
    assert sorted(method.wrapped_modules()) == wrappers
    assert bool(wrappers) == (name in ("lora", "adapter"))
