"""Backbone creation: local weight files through timm, hub failures, and the errors a user can make."""

import pytest
import torch
from safetensors.torch import save_file
from timm.models import _builder

from fastprompt.models import create_backbone

NAME = "vit_tiny_patch16_224"
TINY = dict(depth=2, embed_dim=32, num_heads=2, patch_size=8)


def tiny(img_size: int = 32, **overrides):
    torch.manual_seed(0)
    return create_backbone(NAME, img_size=img_size, **{**TINY, **overrides})


def test_random_backbone_has_no_classifier_and_requested_grid():
    model = tiny(img_size=48)
    assert model.num_classes == 0
    assert tuple(model.patch_embed.grid_size) == (6, 6)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 32)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_file_loads_through_timm(tmp_path, suffix):
    source = tiny()
    path = tmp_path / f"weights{suffix}"
    state = {key: value.contiguous() for key, value in source.state_dict().items()}
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    loaded = create_backbone(NAME, img_size=32, checkpoint=path, **TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_checkpoint_with_classifier_and_other_resolution_is_resampled(tmp_path):
    torch.manual_seed(0)
    source = create_backbone(NAME, img_size=32, **TINY)
    source.reset_classifier(5)  # a fine-tuned head is dropped: fastprompt adds the task's own
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone(NAME, img_size=64, checkpoint=path, **TINY)
    assert loaded.pos_embed.shape == (1, 1 + 8 * 8, 32)  # resampled by timm from 4x4 to 8x8 patches
    assert torch.equal(loaded.pos_embed[:, :1], source.pos_embed[:, :1])  # class token position kept
    assert torch.equal(loaded.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(ValueError, match="does not match model.*missing keys.*blocks.2"):
        create_backbone(NAME, img_size=32, checkpoint=path, **{**TINY, "depth": 3})
    with pytest.raises(ValueError, match="does not match model.*size mismatch"):
        create_backbone(NAME, img_size=32, checkpoint=path, **{**TINY, "embed_dim": 64})


def test_unreadable_or_missing_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a weight file")
    with pytest.raises(ValueError, match="cannot read .*junk.pth as a weight file"):
        create_backbone(NAME, img_size=32, checkpoint=junk, **TINY)
    with pytest.raises(ValueError, match="does not exist"):
        create_backbone(NAME, img_size=32, checkpoint=tmp_path / "absent.pth", **TINY)


def test_pretrained_without_network_says_use_checkpoint(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(_builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(_builder, "load_state_dict_from_url", offline)
    with pytest.raises(
        ValueError, match=r"could not load.*huggingface.co/timm/vit_tiny_patch16_224\.augreg.*--weights FILE"
    ):
        create_backbone(NAME, img_size=32, pretrained=True, **TINY)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="unknown model 'vit_tiny_patch16'.*did you mean.*vit_tiny_patch16_224"):
        create_backbone("vit_tiny_patch16", img_size=32)


@pytest.mark.parametrize(
    "img_size, message",
    [(4, "smaller than one 8-pixel patch"), (36, "not divisible by the 8-pixel patch.*use 32 or 40")],
)
def test_image_size_must_fit_the_patch(img_size, message):
    with pytest.raises(ValueError, match=message):
        create_backbone(NAME, img_size=img_size, **TINY)


def test_bad_model_options_and_non_vit():
    with pytest.raises(ValueError, match="does not accept these model options.*no_such_option"):
        create_backbone(NAME, img_size=32, no_such_option=1)
    with pytest.raises(ValueError, match="set by fastprompt itself"):
        create_backbone(NAME, img_size=32, num_classes=3)
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        create_backbone("resnet18", img_size=32)
    with pytest.raises(ValueError, match="either --pretrained .* or --checkpoint"):
        create_backbone(NAME, img_size=32, pretrained=True, checkpoint="weights.pth")
