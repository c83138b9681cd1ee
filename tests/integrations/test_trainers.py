"""fastprompt models under other trainers: Hugging Face Trainer (plain and DeepSpeed ZeRO-2 on CPU) and Lightning
(2-process DDP on gloo, DeepSpeed ZeRO-2 on CPU). Each run trains a tiny EPT-patched HF ViT in a subprocess
(tests/workers/trainer_worker.py); this file checks, independently of the worker: the loss falls, only trainable tensors
change, the saved file holds only trainable tensors, and reloading the saved weights gives identical logits."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import WORKERS
from workers import trainer_worker

import fastprompt

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORKER = WORKERS / "trainer_worker.py"

DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker(mode: str, out: Path, *, single_rank: bool = False, timeout: int = 240) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in DIST_KEYS}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    if single_rank:  # what torchrun / the deepspeed launcher would set for one process
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    result = subprocess.run(
        [sys.executable, str(WORKER), mode, str(out)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


def trainable() -> list[str]:
    """What EPT trains on the worker's 2-layer ViT: one prompt per layer and the new head (checked, not assumed)."""
    names = [name for name, p in trainer_worker.build_model().named_parameters() if p.requires_grad]
    prompts = [f"vit.layers.{i}.attention.prompt" for i in range(2)]
    assert sorted(names) == sorted([*prompts, "classifier.weight", "classifier.bias"])
    return names


def check_training(result: dict) -> None:
    assert result["loss_after"] < 0.7 * result["loss_before"], result
    assert sorted(result["changed"]) == sorted(trainable())  # every trainable tensor moved, nothing else did


def saved_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())


def reloaded_logits(path: Path) -> torch.Tensor:
    model = trainer_worker.build_model()  # fresh: the same frozen weights, untrained prompts and head
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.zero_()
    fastprompt.load_trainable(model, path)
    return trainer_worker.logits(model)


@pytest.mark.parametrize("mode", ["hf", "hf-deepspeed"])
def test_hf_trainer_saves_and_reloads_only_the_trainable_weights(mode, tmp_path):
    if mode == "hf-deepspeed":
        pytest.importorskip("deepspeed")
    result = run_worker(mode, tmp_path, single_rank=mode == "hf-deepspeed")
    check_training(result)
    saved = tmp_path / "saved"
    assert sorted(path.name for path in saved.iterdir()) == [
        "trainable.json",
        "trainable.safetensors",
        "training_args.bin",
    ]  # no model.safetensors: the frozen backbone is not written
    assert sorted(saved_keys(saved / "trainable.safetensors")) == sorted(trainable())
    checkpoint = tmp_path / "run" / f"checkpoint-{trainer_worker.STEPS}"
    assert sorted(saved_keys(checkpoint / "trainable.safetensors")) == sorted(trainable())
    assert not (checkpoint / "model.safetensors").exists()
    if mode == "hf-deepspeed":  # DeepSpeed really ran: its engine checkpoint sits beside ours
        assert (checkpoint / f"global_step{trainer_worker.STEPS}").is_dir()
    torch.testing.assert_close(reloaded_logits(saved), torch.tensor(result["logits"]), atol=0, rtol=0)


def test_hf_trainer_resumes_from_a_trainable_only_checkpoint(tmp_path):
    """Stopped half-way and resumed from its checkpoint (trainable weights, optimizer, scheduler, RNG), the run ends
    exactly where an uninterrupted one does; the stopped model itself does not."""
    result = run_worker("hf-resume", tmp_path)
    straight, stopped, resumed = (torch.tensor(result[key]) for key in ("straight", "stopped", "resumed"))
    torch.testing.assert_close(resumed, straight, atol=0, rtol=0)
    assert (stopped - straight).abs().max() > 1e-3
    half = tmp_path / "run-resume" / f"checkpoint-{trainer_worker.STEPS // 2}"
    assert sorted(saved_keys(half / "trainable.safetensors")) == sorted(trainable())


def lightning_state(path: Path, deepspeed: bool) -> dict[str, torch.Tensor]:
    if deepspeed:  # a DeepSpeed checkpoint is a folder; the module weights are in DeepSpeed's model-states file
        return torch.load(path / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return torch.load(path, weights_only=False)["state_dict"]


@pytest.mark.parametrize("mode", ["lightning-ddp", "lightning-deepspeed"])
def test_lightning_checkpoints_hold_only_the_trainable_weights(mode, tmp_path):
    pytest.importorskip("lightning")
    deepspeed = mode == "lightning-deepspeed"
    if deepspeed:
        pytest.importorskip("deepspeed")
    result = run_worker(mode, tmp_path)
    assert result["world_size"] == 2
    check_training(result)
    state = lightning_state(tmp_path / "final.ckpt", deepspeed)
    expected = sorted(f"model.{name}" for name in trainable())
    assert sorted(state) == expected
    module = trainer_worker.lightning_module_class()()
    module.load_state_dict(state, strict=False)
    torch.testing.assert_close(trainer_worker.logits(module.model), torch.tensor(result["logits"]), atol=0, rtol=0)
    if not deepspeed:  # and through Lightning's own loader (which calls the mixin's on_load_checkpoint)
        loaded = type(module).load_from_checkpoint(tmp_path / "final.ckpt", weights_only=False)
        torch.testing.assert_close(trainer_worker.logits(loaded.model), torch.tensor(result["logits"]), atol=0, rtol=0)


def test_lightning_deepspeed_strategy_resumes_from_trainable_only_checkpoint(tmp_path):
    """fastprompt's deepspeed_strategy on 2 CPU ranks: the half-way checkpoint holds only trainable weights, and a
    fresh module resumed from it follows the uninterrupted run step by step and ends with its logits."""
    pytest.importorskip("lightning")
    pytest.importorskip("deepspeed")
    result = run_worker("lightning-deepspeed-resume", tmp_path)
    expected = sorted(f"model.{name}" for name in trainable())
    assert sorted(lightning_state(Path(result["checkpoint"]), deepspeed=True)) == expected
    half = trainer_worker.STEPS // 2
    assert result["resumed_losses"] == pytest.approx(result["straight_losses"][half:], abs=1e-6)
    torch.testing.assert_close(torch.tensor(result["resumed"]), torch.tensor(result["straight"]), atol=1e-6, rtol=1e-5)
    untrained = trainer_worker.logits(trainer_worker.build_model())
    assert (untrained - torch.tensor(result["resumed"])).abs().max() > 1e-2  # the weights did come from training


def test_deepspeed_strategy_refuses_bad_options():
    pytest.importorskip("lightning")
    from fastprompt.integrations.lightning import deepspeed_strategy

    with pytest.raises(ValueError, match="stage must be one of 0, 1, 2, 3"):
        deepspeed_strategy(stage=4)
    with pytest.raises(ValueError, match="accelerator must be 'auto', 'cpu' or 'gpu'"):
        deepspeed_strategy(accelerator="tpu")


def test_lightning_mixin_refuses_a_checkpoint_of_other_weights():
    pytest.importorskip("lightning")
    module = trainer_worker.lightning_module_class()()
    checkpoint = {"state_dict": {name: value for name, value in module.state_dict().items()}}
    module.on_save_checkpoint(checkpoint)
    assert sorted(checkpoint["state_dict"]) == sorted(f"model.{name}" for name in trainable())
    module.on_load_checkpoint(checkpoint)  # its own checkpoint is accepted
    del checkpoint["state_dict"]["model.classifier.bias"]
    with pytest.raises(ValueError, match=r"missing \['model.classifier.bias'\]"):
        module.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="unexpected"):
        module.on_load_checkpoint({"state_dict": {"model.vit.layernorm.weight": torch.ones(32)}})
