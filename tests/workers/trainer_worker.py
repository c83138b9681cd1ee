"""Worker for tests/integrations/test_trainers.py: trains a tiny fastprompt-patched HF ViT under another trainer, in
its own process.

    python tests/workers/trainer_worker.py hf|hf-deepspeed|hf-resume|lightning-ddp|lightning-deepspeed[-resume] OUT_DIR

Writes OUT_DIR/result.json: the training losses, the names of the parameters that changed, and the logits of
the trained model on a fixed batch (what the reloaded weights must reproduce). Saved weights go under OUT_DIR.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import fastprompt  # noqa: F401  (before transformers / lightning: repairs torchvision)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers, when run as a script
from helpers import stop_trainer_at, tiny_hf_model  # noqa: E402

CLASSES, STEPS, BATCH, SAMPLES, LR = 3, 18, 4, 24, 0.01


def build_model(method: str = "ept") -> torch.nn.Module:
    """The tiny patched model; the same weights in every process and in the test that reloads it."""
    model = tiny_hf_model(initializer_range=0.2).train()
    torch.manual_seed(1)
    return fastprompt.apply(model, method, num_classes=CLASSES, prompt_length=4)


def dataset() -> list[dict[str, torch.Tensor]]:
    """Images whose class is which third of the image is brightest: learnable in a few steps."""
    generator = torch.Generator().manual_seed(2)
    items = []
    for i in range(SAMPLES):
        label = i % CLASSES
        image = torch.randn(3, 32, 32, generator=generator) * 0.5
        image[:, :, label * 10 : label * 10 + 10] += 2.0
        items.append({"pixel_values": image, "labels": torch.tensor(label)})
    return items


def probe_batch() -> torch.Tensor:
    return torch.stack([item["pixel_values"] for item in dataset()[:6]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(probe_batch()).logits


def dataset_loss(model: torch.nn.Module) -> float:
    """Mean cross-entropy over the whole training set, in eval mode (the training curve's noise-free ends)."""
    was_training = model.training
    model.eval()
    items = dataset()
    with torch.no_grad():
        out = model(torch.stack([i["pixel_values"] for i in items]), labels=torch.stack([i["labels"] for i in items]))
    model.train(was_training)
    return float(out.loss)


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    return [name for name, value in model.state_dict().items() if not torch.equal(before[name], value)]


def run_hf_resume(out: Path) -> dict:
    """Two runs of STEPS steps: straight through, and stopped at a checkpoint half-way then resumed from it."""
    from transformers import TrainingArguments

    from fastprompt.integrations.trainer import FastpromptTrainer

    half = STEPS // 2
    results = {}
    for name in ("straight", "stopped", "resumed"):
        model = build_model()  # resuming starts from untrained prompts and head: the checkpoint must supply them
        args = TrainingArguments(
            output_dir=str(out / ("run-straight" if name == "straight" else "run-resume")),
            per_device_train_batch_size=BATCH,
            max_steps=STEPS,
            learning_rate=LR,
            lr_scheduler_type="linear",
            save_strategy="steps",
            save_steps=half,
            report_to=[],
            use_cpu=True,
            seed=0,
        )
        trainer = FastpromptTrainer(model=model, args=args, train_dataset=dataset())
        if name == "stopped":
            trainer.add_callback(stop_trainer_at(half))
        resume = out / "run-resume" / f"checkpoint-{half}" if name == "resumed" else None
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        results[name] = logits(model).tolist()
    return results


def run_hf(out: Path, deepspeed: bool) -> dict:
    if deepspeed:
        from fastprompt.integrations.trainer import import_deepspeed

        import_deepspeed()  # before TrainingArguments: CPU accelerator, no JIT build of the shm op
    from transformers import TrainingArguments

    from fastprompt.integrations.trainer import FastpromptTrainer

    model = build_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    loss_before = dataset_loss(model)
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
    }
    args = TrainingArguments(
        output_dir=str(out / "run"),
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS,
        report_to=[],
        use_cpu=not deepspeed,
        seed=0,
        dataloader_num_workers=0,
        deepspeed=config if deepspeed else None,
    )
    trainer = FastpromptTrainer(model=model, args=args, train_dataset=dataset())
    trainer.train()
    trainer.save_model(str(out / "saved"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "losses": losses,
        "loss_before": loss_before,
        "loss_after": dataset_loss(model),
        "changed": changed(before, model),
        "logits": logits(model).tolist(),
    }


def lightning_module_class() -> type:
    import lightning

    from fastprompt.integrations.lightning import TrainableCheckpoints

    class Classifier(TrainableCheckpoints, lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = build_model()
            self.losses: list[float] = []

        def training_step(self, batch: dict, batch_index: int) -> torch.Tensor:
            loss = self.model(**batch).loss
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)

    return Classifier


def lightning_trainer(out: Path, deepspeed: bool, steps: int, checkpoint_every: int | None = None) -> object:
    """A 2-process CPU Lightning Trainer (DDP or fastprompt's deepspeed_strategy), checkpointing every
    `checkpoint_every` steps into OUT/checkpoints when given."""
    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    from fastprompt.integrations.lightning import deepspeed_strategy

    callbacks = []
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(out / "checkpoints", every_n_train_steps=checkpoint_every, save_top_k=-1))
    return lightning.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=deepspeed_strategy(stage=2) if deepspeed else "ddp",
        max_steps=steps,
        logger=False,
        enable_checkpointing=bool(checkpoint_every),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
    )


def loader() -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=True)


def run_lightning(out: Path, deepspeed: bool) -> dict:
    module = lightning_module_class()()
    before = {name: value.clone() for name, value in module.model.state_dict().items()}
    loss_before = dataset_loss(module.model)
    trainer = lightning_trainer(out, deepspeed, STEPS)
    trainer.fit(module, loader())
    trainer.save_checkpoint(str(out / "final.ckpt"))
    model = module.model
    return {
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "losses": module.losses,
        "loss_before": loss_before,
        "loss_after": dataset_loss(model),
        "changed": changed(before, model),
        "logits": logits(model).tolist(),
    }


def run_lightning_resume(out: Path) -> dict:
    """DeepSpeed ZeRO-2 on 2 ranks: train STEPS steps with a checkpoint every STEPS // 2, then resume a fresh module
    and Trainer from the half-way checkpoint (trainable weights and optimizer state only) to STEPS."""
    half = STEPS // 2
    straight = lightning_module_class()()
    trainer = lightning_trainer(out, True, STEPS, checkpoint_every=half)
    trainer.fit(straight, loader())
    (checkpoint,) = (out / "checkpoints").glob(f"*step={half}.ckpt")
    resumed = lightning_module_class()()
    trainer = lightning_trainer(out / "resumed", True, STEPS)
    trainer.fit(resumed, loader(), ckpt_path=str(checkpoint))
    return {
        "checkpoint": str(checkpoint),
        "straight": logits(straight.model).tolist(),
        "resumed": logits(resumed.model).tolist(),
        "resumed_losses": resumed.losses,
        "straight_losses": straight.losses,
    }


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    if mode in ("hf", "hf-deepspeed"):
        result = run_hf(out, deepspeed=mode == "hf-deepspeed")
    elif mode == "hf-resume":
        result = run_hf_resume(out)
    elif mode in ("lightning-ddp", "lightning-deepspeed"):
        result = run_lightning(out, deepspeed=mode == "lightning-deepspeed")
    elif mode == "lightning-deepspeed-resume":
        result = run_lightning_resume(out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
