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
