"""Without a network (as on these machines), pretrained weights fail within seconds, not a minute of hub retries,
and the error says how to work offline; the hub is probed once per process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# In a fresh interpreter with an empty Hugging Face cache: fastprompt.load of a run saved from a timm model name
# (so load rebuilds it with pretrained weights), twice; prints the two failure times and the probe count.
SCRIPT = """
import time
import fastprompt
from fastprompt import models
from huggingface_hub.utils import get_session

probes = []
session = get_session()
head = session.head
session.head = lambda *args, **kwargs: (probes.append(kwargs.get("timeout")), head(*args, **kwargs))[1]

backbone = models.create_backbone("vit_tiny_patch16_224", img_size=32, depth=1, embed_dim=32, num_heads=2,
                                  patch_size=8)
fastprompt.save_trainable(fastprompt.apply(backbone, "linear", num_classes=2), "run/weights.safetensors")
for attempt in range(2):
    start = time.perf_counter()
    try:
        fastprompt.load("run/weights.safetensors", allow_download=True)  # allowed, but no network: the probe
    except ValueError as err:
        print(round(time.perf_counter() - start, 2), "|", err)
print("probes", probes)
"""


def test_load_without_network_fails_fast_with_offline_advice(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")  # an empty cache; offline mode not set
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=env,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 3, result.stdout + result.stderr
    for line in lines[:2]:
        seconds, message = line.split(" | ", 1)
        # the probe is bounded by 3 s; the rest is building a 1-block model on a loaded 2-core machine
        assert float(seconds) < 6.0, line
        assert "the Hugging Face hub did not answer" in message
        for advice in ("checkpoint=FILE", "pretrained_cfg_overlay=dict(file=FILE)", "HF_HUB_OFFLINE=1"):
            assert advice in message
    assert lines[2] == "probes [3.0]"  # one probe, with the 3 s bound, for both attempts
    assert "Retrying" not in result.stderr  # huggingface_hub's retry loop never ran
