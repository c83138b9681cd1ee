"""Weights-only save/load (`save_trainable`, `load_trainable`, `load`) and reading runs back (`load_run`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import flip_byte, images
from safetensors.torch import load_file
from safetensors.torch import save_file as save_safetensors
from torch.utils.data import DataLoader, TensorDataset

import fastprompt
from fastprompt import serialization
from fastprompt.engine import CheckpointError, Engine
from fastprompt.models import create_backbone
from fastprompt.serialization import (
    WeightsError,
    load,
    load_run,
    load_trainable,
    read_checkpoint,
    read_trainable,
    save_trainable,
    tensor_digest,
)

ARCH = "vit_tiny_patch16_224"
TINY = dict(depth=2, embed_dim=32, num_heads=4, patch_size=8)
METHODS = {  # method -> options (small, and not all defaults, so the record has to carry them)
    "linear": {},
    "partial": {"blocks": 1},
    "full": {},
    "bitfit": {},
    "lora": {"rank": 2, "alpha": 4.0, "targets": ("qkv", "proj")},
    "adapter": {"reduction": 4},
    "vpt": {"num_tokens": 3},
    "ept": {"prompt_length": 5, "prompt_layers": [1]},
    "fpt+": {"side_input_size": 16, "num_prompts": 4},
    "fpt": {"side_input_size": 16, "num_prompts": 4},
}


def backbone(seed: int = 0, img_size: int = 32, **kwargs):
    """A tiny timm ViT built through fastprompt.models (random weights fixed by `seed`)."""
    torch.manual_seed(seed)
    return create_backbone(ARCH, img_size=img_size, **{**TINY, **kwargs})


def trained(method: str, seed: int = 0, **kwargs):
    """A patched tiny ViT whose trainable parameters hold values no initialisation gives (as after training)."""
    model = fastprompt.apply(backbone(seed, **kwargs), method, num_classes=3, **METHODS[method])
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator))
    return model.eval()


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_public_names():
    for name in ("save_trainable", "load_trainable", "load", "load_run", "read_checkpoint"):
        assert getattr(fastprompt, name) is getattr(serialization, name)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_round_trips_through_load_with_identical_logits(tmp_path, method):
    model = trained(method)
    expected = model(images(seed=5))
    path = save_trainable(model, tmp_path / "w.safetensors")

    stored = load_file(path)
    assert set(stored) == trainable_names(model)  # exactly the trainable tensors, nothing frozen
    assert sum(t.numel() for t in stored.values()) == fastprompt.count_parameters(model)[0]
    record = json.loads((tmp_path / "w.json").read_text())
    assert record["method"] == method and record["num_classes"] == 3
    for key, value in METHODS[method].items():
        assert record["options"][key] == (list(value) if isinstance(value, tuple) else value)
    assert record["backbone"]["name"] == ARCH and record["backbone"]["img_size"] == [32, 32]

    rebuilt = load(path, backbone=backbone())  # a fresh, unpatched backbone: the method is applied from the record
    assert not rebuilt.training
    assert torch.equal(rebuilt(images(seed=5)), expected)


def test_load_trainable_into_a_patched_model_and_engine_save(tmp_path):
    model = trained("ept")
    engine = Engine(model, progress=False)
    path = save_trainable(engine, tmp_path / "out")  # a folder: trainable.safetensors + trainable.json
    assert path == tmp_path / "out" / "trainable.safetensors" and (tmp_path / "out" / "trainable.json").is_file()
    assert set(load_file(path)) == set(engine.trainable_state_dict())

    target = fastprompt.apply(backbone(), "ept", num_classes=3, **METHODS["ept"])
    assert not torch.equal(target(images(seed=5)), model(images(seed=5)))
    assert load_trainable(target, tmp_path / "out") is target
    assert torch.equal(target.eval()(images(seed=5)), model(images(seed=5)))


def test_wrapped_models_save_and_load_under_their_own_names(tmp_path):
    model = trained("lora")
    for wrapper in (torch.nn.DataParallel, torch.compile):
        path = save_trainable(wrapper(model), tmp_path / f"{wrapper.__name__}.safetensors")
        assert set(load_file(path)) == trainable_names(model)  # no "module." / "_orig_mod." prefixes
        target = fastprompt.apply(backbone(), "lora", num_classes=3, **METHODS["lora"])
        wrapped = wrapper(target)
        assert load_trainable(wrapped, path) is wrapped
        assert torch.equal(target.eval()(images(seed=5)), model(images(seed=5)))


def test_load_rebuilds_the_backbone_from_a_local_weight_file(tmp_path):
    model = trained("lora")
    path = save_trainable(model, tmp_path / "lora.safetensors")
    frozen = backbone().state_dict()
    save_safetensors({k: v.contiguous() for k, v in frozen.items()}, str(tmp_path / "backbone.safetensors"))
    rebuilt = load(path, backbone=tmp_path / "backbone.safetensors")  # architecture + kwargs from the record
    assert torch.equal(rebuilt(images(seed=5)), model(images(seed=5)))


def test_digest_is_independent_of_order_and_sensitive_to_every_field():
    base = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    digest = tensor_digest(base)
    assert tensor_digest(dict(reversed(base.items()))) == digest
    same_bytes = torch.ones(2, 2).view(torch.int32)
    assert tensor_digest({"a": torch.arange(4.0), "b": same_bytes}) != digest  # dtype alone
    assert tensor_digest({"a": torch.arange(4.0).reshape(2, 2), "b": torch.ones(2, 2)}) != digest  # shape
    assert tensor_digest({"c": torch.arange(4.0), "b": torch.ones(2, 2)}) != digest  # name
    changed = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    changed["b"][1, 1] = 1.0000001
    assert tensor_digest(changed) != digest  # one value


def _data_offset(path: Path) -> int:
    raw = path.read_bytes()
    return 8 + struct.unpack("<Q", raw[:8])[0]


def test_a_flipped_byte_in_the_tensors_fails_the_digest(tmp_path):
    model = trained("lora")
    path = save_trainable(model, tmp_path / "w.safetensors")
    (tmp_path / "w.json").unlink()  # the embedded record alone must catch it
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path) + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    target = fastprompt.apply(backbone(), "lora", num_classes=3, **METHODS["lora"])
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match="failed its digest check"):
        load_trainable(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing loaded


@pytest.mark.parametrize("damage", ["truncate", "garbage", "plain"])
def test_corrupt_truncated_or_foreign_files_are_clear_errors(tmp_path, damage):
    path = save_trainable(trained("linear"), tmp_path / "w.safetensors")
    (tmp_path / "w.json").unlink()
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
        match = "corrupt or truncated"
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file at all")
        match = "corrupt or truncated"
    else:
        save_safetensors({"head.weight": torch.zeros(3, 32)}, str(path))
        match = "not written by fastprompt.save_trainable"
    with pytest.raises(WeightsError, match=match):
        read_trainable(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load(tmp_path / "nothing.safetensors", backbone=backbone())


def test_a_sidecar_from_other_weights_is_refused(tmp_path):
    save_trainable(trained("linear", seed=0), tmp_path / "a.safetensors")
    save_trainable(trained("linear", seed=1), tmp_path / "b.safetensors")
    (tmp_path / "b.json").replace(tmp_path / "a.json")
    with pytest.raises(WeightsError, match="describes other weights"):
        read_trainable(tmp_path / "a.safetensors")
    (tmp_path / "a.json").unlink()
    tensors, record = read_trainable(tmp_path / "a.safetensors")  # the file carries its own record
    assert record["method"] == "linear" and set(tensors) == {"head.weight", "head.bias"}


def test_wrong_backbone_shape_names_the_tensor(tmp_path):
    path = save_trainable(trained("ept"), tmp_path / "ept.safetensors")  # saved at 32x32: 17 tokens per prompt
    with pytest.raises(WeightsError, match=r"blocks\.1\.attn\.prompt is \[17, 5\] in the file but \[65, 5\]") as err:
        load(path, backbone=backbone(img_size=64))
    assert "vit_tiny_patch16_224 at image size 32x32" in str(err.value)
    with pytest.raises(WeightsError, match=r"head\.weight is \[3, 32\] in the file but \[3, 64\]"):
        load(path, backbone=backbone(embed_dim=64))


def test_other_frozen_weights_are_refused_unless_asked(tmp_path):
    model = trained("lora", seed=0)
    path = save_trainable(model, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError, match="frozen weights of this model differ"):
        load(path, backbone=backbone(seed=1))  # same architecture, other weights: it would compute something else
    loaded = load(path, backbone=backbone(seed=1), check_backbone=False)
    lora = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in lora.items()) and lora


def test_a_lower_precision_backbone_warns_that_it_cannot_be_verified(tmp_path):
    model = trained("linear")
    path = save_trainable(model, tmp_path / "w.safetensors")
    target = fastprompt.apply(backbone().to(torch.bfloat16), "linear", num_classes=3)
    with pytest.warns(serialization.BackboneWeightsWarning, match=r"\['float32'\].*\['bfloat16'\]"):
        load_trainable(target, path)
    assert torch.equal(target.head.weight, model.head.weight.to(torch.bfloat16))


def test_missing_and_extra_tensors_are_named(tmp_path):
    model = trained("linear")
    model.norm.requires_grad_(True)  # trained more than the method does: the file holds norm.weight / norm.bias
    path = save_trainable(model, tmp_path / "w.safetensors")
    with pytest.raises(
        WeightsError, match=r"2 tensor\(s\) in the file are not trainable in the model: norm.bias, norm.weight"
    ):
        load(path, backbone=backbone())
    extra = fastprompt.apply(backbone(), "linear", num_classes=3)
    extra.norm.requires_grad_(True)
    extra.blocks[0].norm1.requires_grad_(True)
    with pytest.raises(WeightsError, match=r"2 trainable tensor\(s\) of the model are not in the file: blocks.0.norm1"):
        load_trainable(extra, path)
    with pytest.warns(RuntimeWarning, match="strict=False"):
        with pytest.warns(serialization.BackboneWeightsWarning, match="trains other tensors"):
            load_trainable(extra, path, strict=False)
    assert torch.equal(extra.head.weight, model.head.weight) and torch.equal(extra.norm.weight, model.norm.weight)


def test_method_and_option_mismatches_are_refused(tmp_path):
    path = save_trainable(trained("lora"), tmp_path / "w.safetensors")
    other_alpha = fastprompt.apply(backbone(), "lora", num_classes=3, **{**METHODS["lora"], "alpha": 8.0})
    with pytest.raises(WeightsError, match=r"alpha: saved 4\.0, model 8\.0"):
        load_trainable(other_alpha, path)
    same_defaults = fastprompt.apply(backbone(), "lora", num_classes=3, **METHODS["lora"], dropout=0.0)
    load_trainable(same_defaults, path)  # a default spelled out is the same option
    with pytest.raises(WeightsError, match="holds 'lora' weights but the model has 'adapter'"):
        load_trainable(fastprompt.apply(backbone(), "adapter", num_classes=3), path)
    with pytest.raises(WeightsError, match=r"no fastprompt method applied.*fastprompt\.load"):
        load_trainable(backbone(), path)


def test_load_leaves_the_callers_random_state_alone(tmp_path):
    path = save_trainable(trained("vpt"), tmp_path / "w.safetensors")
    fresh = backbone()
    torch.manual_seed(7)
    load(path, backbone=fresh)  # applying VPT draws random prompts: not from the caller's generator
    after_load = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), after_load)


def test_a_bare_model_without_a_recipe_must_be_passed_as_an_object(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
    model = fastprompt.apply(vit, "bitfit")
    path = save_trainable(model, tmp_path / "w.safetensors")
    assert json.loads((tmp_path / "w.json").read_text())["num_classes"] == 3  # the head it kept
    with pytest.raises(ValueError, match="names no timm architecture"):
        load(path)
    torch.manual_seed(0)
    fresh = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=3)
    assert torch.equal(load(path, backbone=fresh)(images(seed=5)), model.eval()(images(seed=5)))
    with pytest.raises(ValueError, match="neither an existing weight file nor a timm model name"):
        load(path, backbone="no_such_model_or_file")


# ---------------------------------------------------------------------------------------------- runs


def _write_run(run: Path, method: str = "lora", epochs: int = 3) -> Engine:
    """A run folder as `fastprompt train` writes it (random-init backbone saved beside the config)."""
    torch.manual_seed(0)
    base = create_backbone(ARCH, img_size=32, **TINY)
    save_safetensors({k: v.contiguous() for k, v in base.state_dict().items()}, str(run / "backbone.safetensors"))
    model = fastprompt.apply(base, method, num_classes=2, **METHODS[method])
    config = {
        "model": ARCH, "model_kwargs": TINY, "img_size": 32, "seed": 0, "method": method,
        "method_options": {k: list(v) if isinstance(v, tuple) else v for k, v in METHODS[method].items()},
        "classes": ["cat", "dog"], "weights": {"source": "random", "file": "backbone.safetensors"},
    }  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(3)
    labels = torch.arange(8) % 2
    x = torch.randn(8, 3, 32, 32, generator=generator) + 2.0 * labels[:, None, None, None]
    loader = DataLoader(TensorDataset(x, labels), batch_size=4)
    val = DataLoader(TensorDataset(x[:4], torch.tensor([0, 1, 1, 0])), batch_size=4)  # best epoch varies
    engine = Engine(model, lr=0.05, epochs=epochs, output_dir=run, progress=False, backend="torch")
    engine.fit(loader, val)
    return engine


def test_load_run_rebuilds_last_and_best_with_their_epochs(tmp_path):
    engine = _write_run(tmp_path)
    last = load_run(tmp_path, checkpoint="last")
    assert last.classes == ["cat", "dog"] and last.epoch == 3 and last.step_in_epoch == 0
    assert last.metrics == engine.history[-1]
    engine.model.eval()
    assert torch.equal(last.model(images(seed=5)), engine.model(images(seed=5)))

    best = load_run(tmp_path)  # default: best
    assert best.checkpoint.name == "best.pt" and best.best["epoch"] == best.epoch
    assert best.metrics == engine.history[best.epoch - 1]
    payload = read_checkpoint(tmp_path / "checkpoints" / "best.pt")
    state = dict(best.model.named_parameters())
    assert all(torch.equal(state[name], value) for name, value in payload["trainable"].items())
    assert read_checkpoint(tmp_path)["state"] == payload["state"]  # a run folder means its best checkpoint
    documented = {"version", "trainable", "config", "resolved", "optimizer", "scheduler", "state", "history"}
    documented |= {"rng", "running"}
    assert set(payload) == documented | {"world_size", "backend", "model"}, (
        "update the README's checkpoint format table"
    )
    assert set(payload["state"]) == {"epoch", "step_in_epoch", "global_step", "best", "stale_epochs"}
    assert set(payload["state"]["best"]) == {"metric", "value", "epoch"}


def test_load_run_refuses_a_changed_weight_file_and_a_corrupt_checkpoint(tmp_path):
    from fastprompt.io import sha256_file

    _write_run(tmp_path, method="linear", epochs=1)
    config = json.loads((tmp_path / "config.json").read_text())
    weights = tmp_path / "backbone.safetensors"
    config["weights"] = {"source": "file", "file": str(weights), "sha256": sha256_file(weights)}
    (tmp_path / "config.json").write_text(json.dumps(config))
    load_run(tmp_path)  # the recorded digest matches

    state = load_file(weights)
    state["norm.weight"] = state["norm.weight"] + 1.0
    save_safetensors(state, str(weights))
    with pytest.raises(WeightsError, match="changed since training"):
        load_run(tmp_path)

    ckpt = tmp_path / "checkpoints" / "best.pt"
    flip_byte(ckpt)
    with pytest.raises(CheckpointError, match="checksum"):
        read_checkpoint(ckpt)


def test_load_run_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoints/best.pt"):
        load_run(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    Engine(trained("linear"), progress=False).save(tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="'best' or 'last'"):
        load_run(tmp_path, checkpoint="first")


# ---------------------------------------------------------------------------------------------- Hugging Face


HF_OPTIONS = {"linear": {}, "bitfit": {}, "full": {}, "lora": {"rank": 2}, "adapter": {"reduction": 4},
              "vpt": {"num_tokens": 2}, "ept": {"prompt_length": 4}, "fpt": {"side_input_size": 16},
              "fpt+": {"side_input_size": 16}}  # fmt: skip


@pytest.mark.parametrize("method", sorted(HF_OPTIONS))
def test_hugging_face_models_save_and_load_from_a_local_folder(tmp_path, monkeypatch, method):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "hf")

    def fresh():
        return transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf", local_files_only=True)

    options = HF_OPTIONS[method]
    model = fastprompt.apply(fresh(), method, num_classes=3, **options)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param))

    def logits(m):
        out = m.eval()(images(seed=5))
        return out.logits if hasattr(out, "logits") else out

    path = save_trainable(model, tmp_path / "w.safetensors")
    record = json.loads((tmp_path / "w.json").read_text())
    assert record["backbone"]["library"] == "transformers" and record["backbone"]["img_size"] == [32, 32]
    assert set(load_file(path)) == trainable_names(model)
    assert torch.equal(logits(load(path, backbone=tmp_path / "hf")), logits(model))  # a local folder
    assert torch.equal(logits(load(path, backbone=fresh())), logits(model))  # a model object
