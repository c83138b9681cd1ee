"""fastprompt.Engine under 2 ranks (torchrun, gloo, CPU) trains to the same parameters as 1 rank at the same global
batch, on the torch backend (DistributedDataParallel) and on DeepSpeed ZeRO-2."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from helpers import REPO, WORKERS, shuffled, tiny_data, tiny_tuned_vit

from fastprompt.engine import Engine

WORKER = WORKERS / "engine_worker.py"


def test_two_ranks_match_one_rank(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(WORKER), "dist", str(tmp_path)], env=env, capture_output=True, text=True, timeout=110
    )
    assert result.returncode == 0, result.stderr[-4000:]
    two_ranks = torch.load(tmp_path / "dist.pt")

    for backend, stage in (("torch", 0), ("deepspeed", 2)):
        engine = Engine(
            tiny_tuned_vit("lora"), lr=1e-2, epochs=2, backend=backend, zero_stage=stage, clip_grad=1.0, progress=False
        )
        engine.fit(shuffled(tiny_data(), batch_size=8))
        one_rank = engine.trainable_state_dict()
        assert one_rank.keys() == two_ranks[backend].keys()
        for name, value in one_rank.items():
            torch.testing.assert_close(two_ranks[backend][name], value, atol=1e-5, rtol=1e-4, msg=f"{backend} {name}")
