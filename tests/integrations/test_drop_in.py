"""Drop-in: a patched model passes the model libraries' own checks.

The timm part reproduces the assertions of timm's tests/test_models.py (forward, backward, forward_intermediates,
forward_features / forward_head, reset_classifier, fx forward / backward, torchscript); the Hugging Face part those
of transformers' ModelTesterMixin (attentions, hidden states, gradient checkpointing, interpolate_pos_encoding,
half precision, torch.export, torch.save / deepcopy, save_pretrained). Every method, tiny models, CPU.
"""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys

import pytest
import timm
import torch
from helpers import images, tiny_hf_model, tiny_vit
from timm.layers import Attention
from timm.models.vision_transformer import Block

import fastprompt
from fastprompt.kernels.reference import ept_attention_reference
from fastprompt.methods import hf
from fastprompt.methods.classes import TorchScriptUnsupportedError

OPTIONS = {
    "linear": {},
    "bitfit": {},
    "lora": {"rank": 2},
    "adapter": {"reduction": 4},
    "vpt": {"num_tokens": 3},
    "ept": {"prompt_length": 3},
}
METHODS = list(OPTIONS)
PROMPTS = 3  # VPT tokens
DEPTH = 3  # timm's tests want at least 3 feature levels
HF_CLASSIFIERS = {"vit": "ViTForImageClassification", "dinov2": "Dinov2ForImageClassification"}


def timm_model(method: str, **kwargs) -> torch.nn.Module:
    model = fastprompt.apply(tiny_vit(depth=DEPTH, **kwargs), method, **OPTIONS[method])
    if method in ("lora", "adapter"):  # start away from the identity so that a skipped update shows
        for name, param in model.named_parameters():
            if "lora_B" in name or "adapter.up" in name:
                torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def hf_model(kind: str, method: str, **config) -> torch.nn.Module:
    model = fastprompt.apply(tiny_hf_model(HF_CLASSIFIERS[kind], **config), method, **OPTIONS[method])
    for name, param in model.named_parameters():
        if "lora_B" in name or "adapter.up" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def hf_images(kind: str, count: int = 2) -> torch.Tensor:
    return images(32 if kind == "vit" else 28, count)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------- timm


@pytest.mark.parametrize("method", METHODS)
def test_timm_forward_and_backward(method):
    """timm's test_model_forward / test_model_backward: batch-consistent outputs, every trainable parameter a grad."""
    model = timm_model(method, num_classes=42)
    x = images()
    out = model(x)
    assert out.shape == (2, 42) and not out.isnan().any()
    torch.testing.assert_close(model(x[:1]), out[:1], rtol=1e-4, atol=1e-5)
    model.train()
    model(x).mean().backward()
    missing = [n for n, p in trainable(model).items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"


def manual_vpt_tokens(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's output of a deep-VPT timm model, prompts inserted by hand as the VPT paper describes."""
    tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))  # no prompts in the embeddings
    prompts = model.vpt.prompts
    outputs = []
    for i, block in enumerate(model.blocks):
        rest = tokens[:, 1:] if i == 0 else tokens[:, 1 + PROMPTS :]
        tokens = torch.cat([tokens[:, :1], prompts[i].expand(x.shape[0], -1, -1), rest], dim=1)
        tokens = Block.forward(block, tokens)  # timm's own Block.forward (past VPTBlock)
        outputs.append(tokens)
    return outputs


@pytest.mark.parametrize("method", METHODS)
def test_timm_forward_intermediates(method):
    """timm's test_model_forward_intermediates: NCHW maps per block, final output == forward_features (also with
    grad checkpointing)."""
    model = timm_model(method)
    x = images()
    output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert [tuple(t.shape) for t in intermediates] == [(2, 32, 4, 4)] * DEPTH
    torch.testing.assert_close(output, model.forward_features(x), rtol=0, atol=0)
    layers = model.get_intermediate_layers(x, n=2, reshape=True)
    assert [tuple(t.shape) for t in layers] == [(2, 32, 4, 4)] * 2
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(output3, output, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change", ["dynamic_img_size", "set_input_size"])
def test_timm_vpt_other_image_sizes_resample_the_position_embedding_as_timm(change):
    """The prompts are prefix tokens, but the position embedding has no rows for them."""
    kwargs = {"dynamic_img_size": True} if change == "dynamic_img_size" else {}
    model, reference = timm_model("vpt", **kwargs), tiny_vit(depth=DEPTH, **kwargs).eval()
    if change == "set_input_size":
        model.set_input_size(img_size=48)
        reference.set_input_size(img_size=48)
        torch.testing.assert_close(model.pos_embed, reference.pos_embed, rtol=0, atol=0)
    x = images(48)
    torch.testing.assert_close(model._pos_embed(model.patch_embed(x)), reference._pos_embed(reference.patch_embed(x)))
    assert model(x).shape == (2, 4)


def test_timm_vpt_intermediates_are_the_prompted_blocks_without_prompt_tokens():
    model = timm_model("vpt")
    x = images()
    expected = manual_vpt_tokens(model, x)
    _, intermediates = model.forward_intermediates(x, output_fmt="NLC")
    for got, want in zip(intermediates, expected):
        torch.testing.assert_close(got, want[:, 1 + PROMPTS :], rtol=1e-5, atol=1e-6)
    _, pairs = model.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True)
    torch.testing.assert_close(pairs[-1][1], expected[-1][:, : 1 + PROMPTS], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.forward_features(x), model.norm(expected[-1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_timm_default_cfg_features_head_and_reset_classifier(method):
    """timm's test_model_default_cfgs_non_std: feature and pre-logit widths, reset_classifier(0) pools."""
    model = timm_model(method)
    x = images()
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[-1] == model.num_features and pre_logits.shape[1] == model.head_hidden_size
    torch.testing.assert_close(model.forward_head(features), model(x))
    model.reset_classifier(0)
    assert model.num_classes == 0
    out = model(x)
    assert out.shape == pre_logits.shape
    torch.testing.assert_close(out, pre_logits)
    state = model.state_dict()
    assert "patch_embed.proj.weight" in state


def fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's _create_fx_model: torchvision's feature extractor with timm's tracer settings, last node returned."""
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs
    )


@pytest.mark.parametrize("method", METHODS)
def test_timm_fx_forward_and_backward(method):
    """timm's test_model_forward_fx (bit-identical outputs) and test_model_backward_fx (every trainable grad)."""
    model = timm_model(method, num_classes=42)
    x = images()
    with torch.inference_mode():
        expected = model(x)
        traced = tuple(fx_model(model)(x).values())[0]
    assert torch.equal(traced, expected)
    model.train()
    traced = fx_model(model, train=True)
    out = tuple(traced(x).values())[0]
    out.mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.requires_grad and p.grad is None]
    assert out.shape[-1] == 42 and not missing


@pytest.mark.parametrize("method", METHODS)
def test_timm_torchscript_gives_the_patched_outputs_or_one_clear_error(method):
    """timm's test_model_forward_torchscript, or TorchScriptUnsupportedError: never the unpatched outputs."""
    model = timm_model(method)
    x = images()
    try:
        scripted = torch.jit.script(model)
    except TorchScriptUnsupportedError as err:
        assert method in ("ept", "vpt", "adapter")
        assert f"method {method!r}" in str(err) and "torch.compile" in str(err) and "torch.export" in str(err)
        return
    torch.testing.assert_close(scripted(x), model(x))


@pytest.mark.parametrize("method", ["ept", "vpt", "adapter"])
def test_timm_reentrant_grad_checkpointing_trains_the_method(method):
    """timm's set_grad_checkpointing with timm's reentrant switch on: the same gradients as without."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    x = images()
    grads = []
    before = use_reentrant_ckpt()
    try:
        set_reentrant_ckpt(True)
        for checkpointing in (False, True):
            model = timm_model(method).train()
            model.set_grad_checkpointing(checkpointing)
            model(x).square().sum().backward()
            grads.append({n: p.grad for n, p in trainable(model).items()})
    finally:
        set_reentrant_ckpt(before)
    plain, checkpointed = grads
    assert not [n for n, g in checkpointed.items() if g is None]
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"scale_attn_norm": True}])
def test_timm_ept_attention_is_timms_attention_when_the_sink_is_empty(variant):
    """EPTAttention repeats timm's q/k/v and output code: pinned to timm's own Attention.forward (prompts at -inf)."""
    model = timm_model("ept", **variant)
    x = torch.randn(2, 17, 32)
    for block in model.blocks:
        with torch.no_grad():
            block.attn.prompt.fill_(-math.inf)
            if variant.get("scale_attn_norm"):  # a norm that is not the identity
                torch.nn.init.normal_(block.attn.norm.weight)
        torch.testing.assert_close(block.attn(x), Attention.forward(block.attn, x), rtol=1e-5, atol=1e-6)


def test_timm_unsupported_masks_name_the_method_and_the_alternative():
    with pytest.raises(ValueError, match="EPT does not support is_causal=True.*without is_causal"):
        timm_model("ept").forward_features(images(), is_causal=True)
    with pytest.raises(ValueError, match="VPT does not support an attention mask.*without attn_mask"):
        timm_model("vpt").forward_features(images(), attn_mask=torch.ones(17, 17, dtype=torch.bool))


def test_timm_ept_key_mask_is_the_official_attention_over_the_kept_keys():
    model = timm_model("ept")
    attn = model.blocks[0].attn
    x = torch.randn(2, 17, 32)
    kept = 11
    mask = (torch.arange(17) < kept).expand(17, 17)  # keys from `kept` on are padding
    q, k, v = attn.qkv(x).reshape(2, 17, 3, 4, 8).permute(2, 0, 3, 1, 4)
    core = ept_attention_reference(q, k[:, :, :kept], v[:, :, :kept], attn.prompt, scale=8**-0.5)
    expected = attn.proj(core.transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(attn(x, attn_mask=mask), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn(x, attn_mask=torch.ones(17, 17, dtype=torch.bool)), attn(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ whole-model save


def roundtrip(model: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


NAMES = {"ept": "EPT", "vpt": "VisualPrompts", "adapter": "Adapter", "lora": "LoRALinear"}


@pytest.mark.parametrize("method", METHODS)
def test_timm_torch_save_deepcopy_and_print(method):
    model = timm_model(method)
    x = images()
    expected = model(x)
    for twin in (roundtrip(model), copy.deepcopy(model)):
        torch.testing.assert_close(twin(x), expected, rtol=0, atol=0)
        assert [n for n, _ in twin.named_parameters()] == [n for n, _ in model.named_parameters()]
    if method in NAMES:
        assert NAMES[method] in str(model)
    if method == "vpt":
        assert "VPTVisionTransformer" in str(model) and "VPTBlock" in str(model)


def test_checkpointed_vpt_pickles_prints_its_policy_and_unwraps():
    from fastprompt.checkpointing import checkpoint_activations

    model = checkpoint_activations(timm_model("vpt"), "selective", blocks=2).train()
    x = images()
    twin = roundtrip(model)
    assert type(twin.blocks[0]).__name__ == "CheckpointedVPTBlock" and "activation_policy='selective'" in str(twin)
    model(x).sum().backward()
    twin(x).sum().backward()
    torch.testing.assert_close(twin.vpt.prompts.grad, model.vpt.prompts.grad, rtol=0, atol=0)
    checkpoint_activations(twin, "none")
    assert type(twin.blocks[0]).__name__ == "VPTBlock" and type(twin.blocks[2]).__name__ == "VPTBlock"


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
@pytest.mark.parametrize("method", METHODS)
def test_hf_torch_save_deepcopy_and_print(kind, method):
    model = hf_model(kind, method)
    x = hf_images(kind)
    expected = model(x).logits
    for twin in (roundtrip(model), copy.deepcopy(model)):
        torch.testing.assert_close(twin(x).logits, expected, rtol=0, atol=0)
    if method in NAMES:
        assert NAMES[method] in str(model)
    assert type(model).__name__ == HF_CLASSIFIERS[kind]  # save_pretrained records the HF class


LOAD_SCRIPT = """
import sys, torch
import fastprompt  # noqa: F401
for path in sys.argv[1:]:
    model, x, expected = torch.load(path, weights_only=False)
    out = model(x)
    out = out if isinstance(out, torch.Tensor) else out.logits
    assert torch.equal(out, expected), path
    print(type(model).__name__)
"""


def test_whole_model_save_loads_in_a_fresh_process(tmp_path):
    """The swapped classes are rebuilt by name in a process that never applied a method."""
    paths = []
    for name, model, x in [
        ("ept", timm_model("ept"), images()),
        ("vpt", timm_model("vpt"), images()),
        ("hf_vpt", hf_model("vit", "vpt"), hf_images("vit")),
        ("hf_ept", hf_model("dinov2", "ept"), hf_images("dinov2")),
    ]:
        out = model(x)
        torch.save((model, x, out if isinstance(out, torch.Tensor) else out.logits), tmp_path / f"{name}.pt")
        paths.append(str(tmp_path / f"{name}.pt"))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, *paths], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [
        "VisionTransformer",
        "VPTVisionTransformer",
        "ViTForImageClassification",
        "Dinov2ForImageClassification",
    ]


# ------------------------------------------------------------------------------------------ Hugging Face

HF_CASES = [(kind, method) for kind in ("vit", "dinov2") for method in METHODS]


def hf_tokens(kind: str, method: str) -> int:
    return 17 + (PROMPTS if method == "vpt" else 0)


@pytest.mark.parametrize(("kind", "method"), HF_CASES)
def test_hf_attentions_and_hidden_states(kind, method):
    """ModelTesterMixin's test_attention_outputs / test_hidden_states_output / test_retain_grad_hidden_states_attentions
    (eager attention, as transformers' tests run them). VPT's sequence includes its prompts (docs/drop-in.md)."""
    model = hf_model(kind, method)
    model.set_attn_implementation("eager")
    tokens = hf_tokens(kind, method)
    out = model(hf_images(kind), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and len(out.hidden_states) == 3
    assert all(a.shape == (2, 4, tokens, tokens) for a in out.attentions)
    assert [h.shape[1] for h in out.hidden_states] == [tokens] * 3
    if method != "linear":  # with a frozen backbone only the method's layers carry gradients
        out.attentions[-1].retain_grad()
        out.hidden_states[-1].retain_grad()
        out.logits.sum().backward()
        assert out.attentions[-1].grad is not None and out.hidden_states[-1].grad is not None
    sums = torch.stack(out.attentions).sum(-1)
    if method == "ept":
        assert (sums < 1).all() and (sums > 0).all()  # the sink takes its share
    else:
        torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_hf_ept_attentions_are_the_official_probabilities(kind):
    """With the default (sdpa) attention too: prompts at -inf give the unpatched eager attentions."""
    model = hf_model(kind, "ept")
    with torch.no_grad():
        for attn in hf.attention_modules(model).values():
            attn.prompt.fill_(-math.inf)
    reference = tiny_hf_model(HF_CLASSIFIERS[kind])
    reference.set_attn_implementation("eager")
    x = hf_images(kind)
    got = model(x, output_attentions=True).attentions
    want = reference(x, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert model(x).attentions is None or model(x).attentions == ()  # fused path: nothing asked, nothing kept
    model.set_attn_implementation("eager")
    model.config.output_attentions = True  # asked through the config instead of the call
    assert len(model(x).attentions) == 2


@pytest.mark.parametrize(("kind", "method"), [c for c in HF_CASES if c[1] != "linear"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_gradient_checkpointing_trains_the_method(kind, method, reentrant):
    """ModelTesterMixin's test_training_gradient_checkpointing(_use_reentrant): the same gradients as without."""
    x = hf_images(kind)
    grads = []
    for checkpointing in (False, True):
        model = hf_model(kind, method).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(x).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in trainable(model).items()})
    plain, checkpointed = grads
    missing = [n for n, g in checkpointed.items() if g is None and "classifier" not in n]
    assert not missing, f"no gradient under checkpointing for {missing}"
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_hf_interpolate_pos_encoding(method):
    """ModelTesterMixin-style: another image size with interpolate_pos_encoding=True (ViT; DINOv2 always does)."""
    for kind, size in (("vit", 48), ("dinov2", 42)):
        model = hf_model(kind, method)
        kwargs = {"interpolate_pos_encoding": True} if kind == "vit" else {}
        out = model(images(size), **kwargs).logits
        assert out.shape == (2, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_hf_half_precision(method, dtype):
    """ModelTesterMixin's fp16 / bf16 forward: runs, stays finite and close to float32."""
    model = hf_model("vit", method)
    x = hf_images("vit")
    expected = model(x).logits
    out = model.to(dtype)(x.to(dtype)).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.1, atol=0.1)


@pytest.mark.parametrize(("kind", "method"), HF_CASES)
def test_hf_torch_export(kind, method):
    """ModelTesterMixin's test_torch_export: Hugging Face passes an all-ones attention mask while exporting."""
    model = hf_model(kind, method)
    x = hf_images(kind)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ept", "vpt"])
def test_hf_masks_that_mask_nothing_change_nothing(method):
    model = hf_model("vit", method)
    x = hf_images("vit")
    everything = torch.ones(2, 17, dtype=torch.bool)
    torch.testing.assert_close(model(x, attention_mask=everything).logits, model(x).logits, rtol=1e-5, atol=1e-6)


def test_hf_ept_key_mask_is_the_official_attention_over_the_kept_keys():
    model = hf_model("vit", "ept")
    attn = hf.attention_modules(model)[0]
    h = torch.randn(2, 17, 32)
    kept = 9
    mask = (torch.arange(17) < kept).expand(2, 1, 17, 17)
    q, k, v = (proj(h).view(2, 17, 4, 8).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    core = ept_attention_reference(q, k[:, :, :kept], v[:, :, :kept], attn.prompt, scale=8**-0.5)
    expected = attn.o_proj(core.transpose(1, 2).reshape(2, 17, 32))
    torch.testing.assert_close(attn(h, mask)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
@pytest.mark.parametrize("method", ["ept", "vpt", "lora"])
def test_hf_save_pretrained_folder_loads_back_patched(tmp_path, kind, method):
    """ModelTesterMixin's test_save_load: `fastprompt.load(folder)` restores the patched model; `from_pretrained`
    alone gives the unpatched backbone (documented in docs/drop-in.md)."""
    model = hf_model(kind, method)
    x = hf_images(kind)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "trainable.safetensors").is_file() and (tmp_path / "config.json").is_file()
    loaded = fastprompt.load(tmp_path)  # the folder is the backbone too
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    plain = type(tiny_hf_model(HF_CLASSIFIERS[kind])).from_pretrained(tmp_path)
    assert not torch.allclose(plain(x).logits, model(x).logits)


def test_timm_library_check_still_sees_timm():
    """Swapped classes keep their library's module, so checks by module (and the saved record) still work."""
    model = timm_model("vpt")
    assert type(model).__module__ == timm.models.vision_transformer.__name__
    assert hf.is_hf_model(hf_model("vit", "vpt")) and not hf.is_hf_model(model)
