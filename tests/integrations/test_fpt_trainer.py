"""FPT / FPT+ on a Hugging Face ViT under `FastpromptTrainer`: Hugging Face style calls (`pixel_values=`, `labels=`,
a `ModelOutput`), training that moves only the side parts, trainable-only saves, exact resume, the cached path from
a `datasets.Dataset`, and the image-size error."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TESTS, stop_trainer_at, tiny_hf_model

import fastprompt
from fastprompt.data import FeatureCache, hf_feature_transform, preload

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import TrainingArguments, ViTModel  # noqa: E402

from fastprompt.integrations.trainer import FastpromptTrainer  # noqa: E402

CLASSES, IMG, SIDE, STEPS, BATCH = 3, 32, 16, 3, 4


def build_backbone(seed: int = 0) -> ViTModel:
    """tests/helpers.py's tiny HF ViT without pooler or head; the same weights for the same seed."""
    return tiny_hf_model("ViTModel", seed, add_pooling_layer=False, initializer_range=0.2)


def build_fpt() -> torch.nn.Module:
    """FPT+ on `build_backbone()`; the same weights on every call."""
    backbone = build_backbone()
    torch.manual_seed(1)
    return fastprompt.apply(backbone, "fpt+", num_classes=CLASSES, side_input_size=SIDE)


def rows(count: int = 12) -> list[dict[str, torch.Tensor]]:
    """Images whose class is which third of the image is brightest."""
    generator = torch.Generator().manual_seed(2)
    items = []
    for i in range(count):
        label = i % CLASSES
        image = torch.randn(3, IMG, IMG, generator=generator) * 0.5
        image[:, :, label * 10 : label * 10 + 10] += 2.0
        items.append({"pixel_values": image, "labels": torch.tensor(label)})
    return items


def probe_logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=torch.stack([row["pixel_values"] for row in rows()[:6]])).logits


def arguments(out, **kwargs) -> TrainingArguments:
    options = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=0.05,
        lr_scheduler_type="linear", save_strategy="steps", save_steps=1, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0,
    )  # fmt: skip
    return TrainingArguments(**{**options, **kwargs})


def test_hugging_face_call_returns_loss_and_logits_like_vit_for_image_classification():
    model = build_fpt().eval()
    images = torch.stack([row["pixel_values"] for row in rows()[:4]])
    labels = torch.tensor([0, 1, 2, 0])
    out = model(pixel_values=images, labels=labels)
    assert isinstance(out, transformers.modeling_outputs.ImageClassifierOutput)
    torch.testing.assert_close(out.logits, model(images))  # the timm-style call: same logits, a plain tensor
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    multi_hot = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    out = model(pixel_values=images, labels=multi_hot)
    torch.testing.assert_close(out.loss, F.binary_cross_entropy_with_logits(out.logits, multi_hot))
    features = model.extract_features(images)  # cached features: the side input is derived from pixel_values
    torch.testing.assert_close(model(pixel_values=images, **features).logits, out.logits)


def test_fpt_trains_under_fastprompt_trainer_saves_and_resumes(tmp_path):
    model = build_fpt()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    trainer = FastpromptTrainer(model=model, args=arguments(tmp_path / "straight"), train_dataset=rows())
    trainer.train()
    changed = {name for name, value in model.state_dict().items() if not torch.equal(before[name], value)}
    side = {name for name, p in model.named_parameters() if p.requires_grad}
    assert side and all(name.startswith(("fusion.", "side.")) for name in side)
    assert changed == side  # every side-network / fusion tensor moved; no backbone tensor did
    straight = probe_logits(model)

    trainer.save_model(str(tmp_path / "saved"))
    fresh = build_fpt()
    assert not torch.equal(probe_logits(fresh), straight)
    fastprompt.load_trainable(fresh, tmp_path / "saved")
    torch.testing.assert_close(probe_logits(fresh), straight, atol=0, rtol=0)

    stopped = build_fpt()
    trainer = FastpromptTrainer(model=stopped, args=arguments(tmp_path / "resume"), train_dataset=rows())
    trainer.add_callback(stop_trainer_at(STEPS - 1))
    trainer.train()
    assert (probe_logits(stopped) - straight).abs().max() > 1e-4
    resumed = build_fpt()  # untrained side parts: the checkpoint must supply them, and the optimizer and RNG state
    trainer = FastpromptTrainer(model=resumed, args=arguments(tmp_path / "resume"), train_dataset=rows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "resume" / f"checkpoint-{STEPS - 1}"))
    torch.testing.assert_close(probe_logits(resumed), straight, atol=0, rtol=0)


def test_cached_features_from_a_datasets_dataset_train_like_the_images(tmp_path):
    """The recipe of docs/fpt_hf_trainer.md: preload, a `cache_key` column, `hf_feature_transform`. With a float32
    cache the run is the uncached run (the same losses), while the backbone never runs during training."""
    datasets = pytest.importorskip("datasets")
    items = rows()
    model = build_fpt()
    cache = FeatureCache(tmp_path / "cache", dtype=torch.float32)
    report = preload(model, [row["pixel_values"] for row in items], cache, progress=False)
    table = datasets.Dataset.from_dict(
        {
            "cache_key": report.keys,
            "pixel_values": [row["pixel_values"].numpy() for row in items],
            "labels": [int(row["labels"]) for row in items],
        }
    )

    def side(batch: dict) -> dict:
        return {
            "pixel_values": [torch.as_tensor(image).float() for image in batch["pixel_values"]],
            "labels": batch["labels"],
        }

    table.set_transform(hf_feature_transform(cache, side))
    model.release_backbone()  # training reads only the cache: a backbone call would raise
    trainer = FastpromptTrainer(
        model=model,
        args=arguments(tmp_path / "cached", remove_unused_columns=False, logging_steps=1, save_strategy="no"),
        train_dataset=table,
    )
    trainer.train()
    cached_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    plain = build_fpt()
    trainer = FastpromptTrainer(
        model=plain, args=arguments(tmp_path / "plain", logging_steps=1, save_strategy="no"), train_dataset=items
    )
    trainer.train()
    plain_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(cached_losses) == STEPS
    assert cached_losses == pytest.approx(plain_losses, abs=1e-4)
    with pytest.raises(RuntimeError, match="released"):
        model(pixel_values=items[0]["pixel_values"][None])  # no reload given: uncached images are refused clearly

    # saved with the backbone released: the file records the real frozen weights and loads into a full model
    fastprompt.save_trainable(model, tmp_path / "released")
    fastprompt.save_trainable(plain, tmp_path / "kept")
    records = [json.loads((tmp_path / name / "trainable.json").read_text()) for name in ("released", "kept")]
    assert records[0]["backbone"]["frozen"] == records[1]["backbone"]["frozen"]
    fresh = build_fpt()
    fastprompt.load_trainable(fresh, tmp_path / "released")
    for name, value in model.state_dict().items():
        if name.startswith(("fusion.", "side.")):
            torch.testing.assert_close(fresh.state_dict()[name], value, atol=0, rtol=0)


def test_hf_feature_transform_names_the_missing_column_and_entry(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(KeyError, match="cache_key"):
        hf_feature_transform(cache)({"pixel_values": [1]})
    with pytest.raises(RuntimeError, match="preload"):
        hf_feature_transform(cache)({"cache_key": ["ab" * 32]})


@pytest.mark.parametrize("size", [30, 36])
def test_an_image_size_the_backbone_cannot_take_names_the_size_it_needs(size):
    model = build_fpt()
    with pytest.raises(ValueError, match=r"multiples of its patch size 8.*e\.g\. (32×32|40×40)"):
        model(pixel_values=torch.randn(1, 3, size, size), labels=torch.tensor([0]))


def test_released_backbone_reloads_for_uncached_images_and_keeps_its_digest():
    model = build_fpt().eval()
    images = torch.stack([row["pixel_values"] for row in rows()[:2]])
    expected, digest = model(images), model.weights_digest()
    model.release_backbone(reload=build_backbone)
    assert all(p.device.type == "meta" for p in model.backbone.parameters())  # the weights are gone
    assert model.backbone_released and model.weights_digest() == digest
    torch.testing.assert_close(model(images), expected, atol=0, rtol=0)  # reloaded on demand
    assert not model.backbone_released
    model.release_backbone(reload=lambda: build_backbone(seed=5))  # other weights: refused, not silently used
    with pytest.raises(RuntimeError, match="differ from the released ones"):
        model(images)


DDP_SCRIPT = """
import sys
import torch
import fastprompt
from helpers import tiny_hf_model

torch.distributed.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
backbone = tiny_hf_model("ViTModel", add_pooling_layer=False, initializer_range=0.2)
model = fastprompt.apply(backbone, "fpt+", num_classes=3, side_input_size=16)
model.release_backbone()
wrapped = torch.nn.parallel.DistributedDataParallel(model)
synced = {id(p) for p in wrapped._module_parameters}
print(all(p.device.type == "meta" and id(p) not in synced for p in model.backbone.parameters()),
      all(id(p) in synced for p in model.parameters() if p.requires_grad))
"""


def test_a_released_backbone_can_be_wrapped_in_ddp(tmp_path):
    """DDP (the HF Trainer under torchrun, Lightning's ddp) refuses parameters on two device types: the released
    backbone's meta tensors are left out, every trainable parameter is kept. In a subprocess: its own process group."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "store")], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True"], result.stdout
