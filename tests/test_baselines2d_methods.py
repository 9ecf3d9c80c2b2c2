"""Every PEFT method through the same checks (like peft's tests/test_custom_models.py), on tiny configs.

For each (model, decoder, method): forward and backward work, exactly the intended parameters are
trainable (checked by name), an optimizer step changes them and leaves every frozen weight untouched,
and the frozen weights equal the pretrained ones. Additive methods start as the pretrained model.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch

from lsmfm.baselines2d.build import build_model, count_parameters, prepare
from lsmfm.baselines2d.config import ModelConfig, PeftConfig
from lsmfm.baselines2d.registry import METHODS

HEAD = r"head\.(?!prompts$)"
SAM_LAYER = r"encoder\.layers\.\d+\."
VIT_LAYER = r"encoder\.(encoder\.layer|model\.layer|encoder\.layers)\.\d+\."

# (model, decoder, method, peft overrides, regex every trainable name must match, fully)
CASES = [
    ("sam", "default", "lora", {}, rf"{HEAD}.*|{SAM_LAYER}attn\.qkv\.[qv]_delta\.lora_[AB]\.weight"),
    ("sam", "default", "adaptformer", {}, rf"{HEAD}.*|{SAM_LAYER}mlp\.(down|up)_proj\.(weight|bias)"),
    ("sam", "default", "ssf", {}, rf"{HEAD}.*|{SAM_LAYER}.*\.(scale|shift)"),
    (
        "sam",
        "default",
        "fact",
        {},
        rf"{HEAD}.*|encoder\.fact_[uv]\.weight|{SAM_LAYER}attn\.qkv\.[qv]_delta\.core\.weight",
    ),
    ("sam", "default", "attention_tuning", {}, rf"{HEAD}.*|{SAM_LAYER}attn\..*"),
    ("sam", "default", "bias_tuning", {}, rf"{HEAD}.*|{SAM_LAYER}.*\.bias"),
    ("sam", "default", "layernorm_tuning", {}, rf"{HEAD}.*|{SAM_LAYER}layer_norm[12]\.(weight|bias)"),
    ("sam", "default", "frozen", {}, rf"{HEAD}.*"),
    ("sam", "default", "full", {}, r".*"),
    ("sam", "default", "ptsam", {}, r"head\.prompts"),
    ("sam", "default", "ptsam", {"encoder_tokens": 4}, rf"head\.prompts|{SAM_LAYER}attn\.prompts"),
    ("sam", "efficell", "frozen", {}, rf"{HEAD}.*"),
    (
        "dinov2",
        "default",
        "lora",
        {},
        rf"{HEAD}.*|{VIT_LAYER}attention\.[qv]_proj\.lora_[AB]\.default\.weight",
    ),
    ("dinov2", "default", "ssf", {}, rf"{HEAD}.*|{VIT_LAYER}.*\.(scale|shift)"),
    (
        "dinov2",
        "default",
        "fact",
        {},
        rf"{HEAD}.*|encoder\.fact_[uv]\.weight|{VIT_LAYER}attention\.[qv]_proj\.delta\.core\.weight",
    ),
    ("dinov2", "efficell", "adaptformer", {}, rf"{HEAD}.*|{VIT_LAYER}mlp\.(down|up)_proj\.(weight|bias)"),
    (
        "dinov3",
        "default",
        "lora",
        {},
        rf"{HEAD}.*|{VIT_LAYER}attention\.[qv]_proj\.lora_[AB]\.default\.weight",
    ),
    ("dinov3", "default", "layernorm_tuning", {}, rf"{HEAD}.*|{VIT_LAYER}norm[12]\.(weight|bias)"),
    ("clip", "default", "lora", {}, rf"{HEAD}.*|{VIT_LAYER}self_attn\.[qv]_proj\.lora_[AB]\.default\.weight"),
    ("clip", "default", "bias_tuning", {}, rf"{HEAD}.*|{VIT_LAYER}.*\.bias"),
]
ADDITIVE = ["lora", "adaptformer", "ssf", "fact"]



def qlora_unavailable() -> str:
    """Why QLoRA cannot run here ('' when it can): bitsandbytes missing or without a CPU 4-bit backend."""
    try:
        import bitsandbytes  # noqa: F401

        from lsmfm.baselines2d.methods.qlora import quantize_linear

        quantize_linear(torch.nn.Linear(16, 8), "nf4")(torch.randn(2, 16))
    except Exception as exc:  # noqa: BLE001 - any failure means no usable backend here
        return f"bitsandbytes unusable on this machine: {type(exc).__name__}: {exc}"
    return ""


@pytest.fixture(scope="module")
def bases() -> dict[tuple[str, str], torch.nn.Module]:
    """One tiny random model per (name, decoder); each test adapts a deep copy."""
    keys = {(m, d) for m, d, *_ in CASES}
    return {k: build_model(ModelConfig(name=k[0], size="tiny", decoder=k[1])) for k in sorted(keys)}


def normalized(name: str) -> str:
    """A frozen weight's name before its module was wrapped (wrappers insert `.base_layer`)."""
    return name.replace(".base_layer", "")


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {normalized(n): p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def images(batch: int = 2, size: int = 72) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "name,decoder,method,overrides,pattern",
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}{'-' + str(c[3]) if c[3] else ''}" for c in CASES],
)
def test_method_table(bases, name, decoder, method, overrides, pattern):
    base = bases[(name, decoder)]
    pretrained = {n: p.detach().clone() for n, p in base.named_parameters()}
    torch.manual_seed(0)
    model = prepare(
        copy.deepcopy(base), PeftConfig(method=method, rank=4, adapter_dim=8, n_tokens=4, **overrides)
    )

    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "a method must train something"
    wrong = [n for n in trainable if not re.fullmatch(pattern, n)]
    assert not wrong, f"unexpected trainable parameters: {wrong[:5]}"
    if method not in ("frozen", "full", "ptsam"):
        assert any(not n.startswith("head.") for n in trainable), "the method added no encoder parameters"
    if method != "full":
        # everything not trainable is the pretrained model, bit for bit
        for n, p in frozen_state(model).items():
            assert torch.equal(p, pretrained[n]), n

    before = frozen_state(model)
    before_trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = model.logits(images())
    assert out.shape == (2, 1, 72, 72)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    opt.step()
    after = frozen_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before), "a frozen weight changed"
    changed = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before_trainable[n])
    ]
    assert changed, "the optimizer step changed no trainable parameter"


def test_every_registered_method_is_in_the_table():
    assert {c[2] for c in CASES} | {"qlora"} == set(METHODS)


@pytest.mark.parametrize("method", ADDITIVE)
@pytest.mark.parametrize("name", ["sam", "clip"])
def test_additive_methods_start_as_the_pretrained_model(bases, name, method):
    base = bases[(name, "default")].eval()
    model = prepare(copy.deepcopy(base), PeftConfig(method=method, rank=4, adapter_dim=8)).eval()

    def features(m: torch.nn.Module) -> torch.Tensor:
        return m.encode(m.preprocess(images()))[0]

    with torch.no_grad():
        torch.testing.assert_close(features(model), features(base), rtol=0, atol=1e-6)
        torch.testing.assert_close(model.logits(images()), base.logits(images()), rtol=0, atol=1e-6)
        pretrained = {n for n, _ in base.named_parameters()}
        for p in (p for n, p in model.named_parameters() if normalized(n) not in pretrained):
            p.add_(0.1)
        assert (features(model) - features(base)).abs().max() > 1e-3


def test_prompted_attention_without_tokens_is_sams_attention(bases):
    """The deep-prompt attention reimplements SAM's (relative positions, windows) exactly."""
    from lsmfm.baselines2d.methods.ptsam import PromptedAttention

    sam = bases[("sam", "default")]
    x = torch.randn(3, 4, 4, sam.hidden_size)
    for layer in sam.layers[:2]:  # a windowed and a global layer
        prompted = PromptedAttention(layer.attn, n_tokens=0, patch_size=16)
        with torch.no_grad():
            torch.testing.assert_close(prompted(x)[0], layer.attn(x)[0], rtol=1e-5, atol=1e-5)


def test_frozen_encoder_is_run_without_autograd(bases):
    model = prepare(copy.deepcopy(bases[("sam", "default")]), PeftConfig(method="frozen"))
    final, _ = model.encode(model.preprocess(images()))
    assert not final.requires_grad


def test_qlora_trains_lora_over_4bit_weights(bases):
    reason = qlora_unavailable()
    if reason:
        pytest.skip(reason)
    base = bases[("sam", "default")]
    model = prepare(copy.deepcopy(base), PeftConfig(method="qlora", rank=4))
    lora = prepare(copy.deepcopy(base), PeftConfig(method="lora", rank=4))
    assert count_parameters(model) == count_parameters(lora)
    quantized = [m for m in model.layers.modules() if type(m).__name__ == "Linear4bit"]
    assert len(quantized) == 4 * len(model.layers)  # qkv, proj, lin1, lin2
    before = frozen_state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.logits(images()).mean().backward()
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in frozen_state(model).items())


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    import sys

    from lsmfm.baselines2d.methods.qlora import bitsandbytes
    from lsmfm.extras import MissingExtra

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(MissingExtra, match=r"pip install 'lsmfm\[qlora\]'"):
        bitsandbytes()


@pytest.mark.parametrize("name", ["sam", "dinov2", "dinov3", "clip"])
def test_weights_load_from_a_local_folder(bases, tmp_path, name):
    """model.weights as a folder in transformers format (what save_pretrained writes) gives those weights."""
    from transformers import SamModel

    from lsmfm.baselines2d.models.sam import sam_config

    torch.manual_seed(1)
    if name == "sam":
        saved = SamModel(sam_config("tiny"))
        expected = saved.vision_encoder
    else:
        encoder = bases[(name, "default")].encoder
        saved = expected = type(encoder)(encoder.config)
    saved.save_pretrained(tmp_path)
    model = build_model(ModelConfig(name=name, weights=str(tmp_path)))
    loaded = dict(model.encoder.named_parameters())
    assert all(torch.equal(loaded[n], p) for n, p in expected.named_parameters())
    assert model.logits(images(1)).shape == (1, 1, 72, 72)
