"""The mutants of the audit: one behaviour a user would notice, changed at one place, with the tests that own it.

Each `original` must occur exactly once in `file` (else the runner reports the mutant as stale: the code moved, so
update the snippet). `tests` are pytest arguments run with `-x` (files, node ids, or `-k EXPR`); keep them to the
files that own the behaviour, since every mutant reruns them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    what: str


# Tests that check the installed layout itself, which the scratch copy's kernels/ symlink changes on purpose.
DESELECT = ("tests/bench/test_benchmarks_gpu.py::test_an_uninstalled_checkout_imports_the_kernels_through_the_module",)

CKPT = ("tests/engine/test_checkpointing.py",)
ACT = ("tests/engine/test_activation_memory.py",)
HF = ("tests/integrations/test_hf.py",)
PREDICT = ("tests/cli/test_predict.py", "tests/cli/test_cli_outputs.py")
CLI_TRAIN = ("tests/cli/test_cli_train.py", "tests/cli/test_cli.py")
DATA = ("tests/data/test_data.py",)
CACHE = ("tests/data/test_feature_cache.py",)
SINK = ("tests/kernels/test_kernel_contracts.py", "tests/kernels/test_sink_attention.py")
IMPORTANCE = ("tests/kernels/test_kernel_contracts.py", "tests/kernels/test_importance.py")
GPU = ("tests/bench/test_benchmarks_gpu.py", "-m", "not slow")
TUNING = ("tests/kernels/test_kernel_tuning.py",)
SM90_BUCKET = ("tests/kernels/test_sm90_tuning.py", "-k", "bucket")  # compiles for sm_90: minutes, and needs ptxas
SM90_EVEN = ("tests/kernels/test_sm90_tuning.py", "-k", "even")

MUTANTS: list[Mutant] = [
    # ---- the nine behaviours of issue 22's table
    Mutant("ckpt-count-all-refused", "fastprompt/checkpointing.py",
           "if not 0 <= blocks <= depth:", "if not 0 <= blocks < depth:", CKPT,
           "blocks=<depth> (every block) refused"),
    Mutant("hf-vpt-shallow-every-layer", "fastprompt/methods/hf.py",
           "for i, layer in enumerate(layers if deep else layers[:1]):", "for i, layer in enumerate(layers):", HF,
           "shallow VPT inserts its prompts at every layer"),
    Mutant("predict-row-index", "fastprompt/predict.py",
           "probabilities.update(zip(indices, probs.cpu()))",
           "probabilities.update(zip(range(len(indices)), probs.cpu()))", PREDICT,
           "rows indexed by position within the batch"),
    Mutant("predict-multilabel-softmax", "fastprompt/predict.py",
           "return torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)",
           "return torch.softmax(logits, dim=1)", PREDICT, "multi-label probabilities by softmax"),
    Mutant("train-val-unreadable-dropped", "fastprompt/cli/train.py",
           "write_unreadable(out / UNREADABLE_FILE, data, *([val_data] if val_data is not None else []))",
           "write_unreadable(out / UNREADABLE_FILE, data)", CLI_TRAIN, "--val's unreadable images not listed"),
    Mutant("runs-small-longer-side", "fastprompt/cli/runs.py",
           "if size is not None and min(size) < patch:", "if size is not None and max(size) < patch:", CLI_TRAIN,
           "only the longer side checked against the patch"),
    Mutant("importance-fake-dtype", "kernels/importance.py",
           "return q.new_empty(k.shape[:3], dtype=torch.float32)", "return q.new_empty(k.shape[:3])", IMPORTANCE,
           "fake importance returns q's dtype"),
    Mutant("sink-saves-qkv-always", "kernels/sink_attention.py",
           "saved = (q, k, v) if any(ctx.needs_input_grad[:3]) else (None, None, None)", "saved = (q, k, v)", SINK,
           "q/k/v saved for backward when none needs a gradient"),
    Mutant("gpu-determinism-self", "benchmarks/gpu.py",
           "first, second = run(), run()", "first = second = run()", GPU,
           "determinism compares a run with itself"),
    # ---- checkpointing.py
    Mutant("ckpt-selective-keeps-nothing", "fastprompt/checkpointing.py",
           "return CheckpointPolicy.MUST_SAVE if is_attention_op(op) else CheckpointPolicy.PREFER_RECOMPUTE",
           "return CheckpointPolicy.PREFER_RECOMPUTE", CKPT, "selective recomputes attention too"),
    Mutant("ckpt-count-from-output-side", "fastprompt/checkpointing.py",
           "        return list(range(blocks))", "        return list(range(depth - blocks, depth))", CKPT,
           "a count names the last blocks instead of the first"),
    Mutant("ckpt-none-keeps-wrapper", "fastprompt/checkpointing.py",
           'if policy == "none":', 'if policy == "none" and False:', CKPT, "policy none leaves the wrapper on"),
    # ---- engine/activation.py
    Mutant("act-chain-skips-all-selective", "fastprompt/engine/activation.py",
           "[Plan(0, k) for k in range(depth + 1)]", "[Plan(0, k) for k in range(depth)]", ACT,
           "plan chain lacks 'selective on every block'"),
    Mutant("act-predict-no-rebuild", "fastprompt/engine/activation.py",
           'rebuilt = [self.full[i] if policy != "none" else 0 for i, policy in enumerate(policies)]',
           "rebuilt = [0 for i, policy in enumerate(policies)]", ACT,
           "prediction forgets the recomputed block's second output"),
    Mutant("act-policies-reversed", "fastprompt/engine/activation.py",
           'return ["full"] * self.full + ["selective"] * self.selective + ["none"] * rest',
           'return ["none"] * rest + ["selective"] * self.selective + ["full"] * self.full', ACT,
           "plans checkpoint the output side first"),
    Mutant("act-gib-decimal", "fastprompt/engine/activation.py", '"GIB": 2**30,', '"GIB": 10**9,', ACT,
           "GiB read as 10^9 bytes"),
    Mutant("act-livebytes-never-frees", "fastprompt/engine/activation.py",
           "            self.current -= entry[0]", "            pass", ACT, "freed storages stay counted"),
    Mutant("act-profile-no-restore", "fastprompt/engine/activation.py",
           "        _set_policies(model, saved_plan)", "        pass", ACT,
           "profile_step drops the user's checkpointing plan"),
    Mutant("act-selective-no-attention", "fastprompt/engine/activation.py",
           "selective = tuple(min(full[i] + meter.attention_bytes.get(i, 0), kept_t[i])",
           "selective = tuple(min(full[i], kept_t[i])", ACT, "selective blocks counted without the attention kept"),
    # ---- methods/hf.py
    Mutant("hf-vpt-prompts-reach-head", "fastprompt/methods/hf.py",
           "return (torch.cat([x[:, :1], x[:, 1 + vpt.num_tokens :]], dim=1), *args[1:])", "return (x, *args[1:])",
           HF, "VPT prompt tokens not removed before the final norm (DINOv2 mean token)"),
    Mutant("hf-tap-norm-after", "fastprompt/methods/hf.py",
           "normed = layer.norm1(x) if self.dinov2 else layer.layernorm_before(x)",
           "normed = layer.norm1(x) if self.dinov2 else layer.layernorm_after(x)", HF,
           "FPT tap takes q/k/v from the wrong norm"),
    Mutant("hf-tap-finish-norm-before", "fastprompt/methods/hf.py",
           "return x + layer.dropout(layer.mlp(layer.layernorm_after(x)))",
           "return x + layer.dropout(layer.mlp(layer.layernorm_before(x)))", HF,
           "FPT tap's MLP runs on the wrong norm"),
    Mutant("hf-resample-bilinear", "fastprompt/methods/hf.py",
           'mode="bicubic", align_corners=False)', 'mode="bilinear", align_corners=False)', HF,
           "EPT prompt rows resampled unlike HF's position embeddings"),
    Mutant("ept-scale-first-head", "fastprompt/methods/ept.py",
           "state.scales.append(scaling.mean(dim=1))", "state.scales.append(scaling[:, 0])", HF,
           "EPT scale map from the first head instead of the head mean"),
    Mutant("hf-lora-skips-k", "fastprompt/methods/hf.py",
           '"qkv": ("q_proj", "k_proj", "v_proj")', '"qkv": ("q_proj", "v_proj")', HF, "LoRA qkv misses k_proj"),
    # ---- predict.py
    Mutant("predict-multilabel-min", "fastprompt/predict.py",
           'predicted, probability = ";".join(chosen), float(probs.max())',
           'predicted, probability = ";".join(chosen), float(probs.min())', PREDICT,
           "multi-label 'probability' is the lowest class"),
    Mutant("predict-unreadable-silent", "fastprompt/predict.py", "    if unreadable:\n", "    if False:\n", PREDICT,
           "unreadable images dropped without a warning"),
    # ---- cli/train.py, cli/runs.py
    Mutant("train-few-shot-from-val", "fastprompt/cli/train.py",
           "exclude = None if args.val is not None else val_idx", "exclude = None", CLI_TRAIN,
           "--shots may draw validation images into training"),
    Mutant("train-val-small-kept", "fastprompt/cli/train.py",
           "        drop_small_images(val_data, patch)\n", "        pass\n", CLI_TRAIN,
           "--val images below one patch kept"),
    Mutant("runs-all-small-no-error", "fastprompt/cli/runs.py", "        if not kept:\n", "        if False:\n",
           CLI_TRAIN, "a folder of only too-small images is not refused"),
    # ---- data/
    Mutant("splits-exclude-ignored", "fastprompt/data/splits.py", "held_out[excluded] = True", "pass", DATA,
           "few-shot splits draw excluded (validation) indices"),
    Mutant("splits-k-plus-one", "fastprompt/data/splits.py",
           "chosen.update(order[np.flatnonzero(ranked[:, column])[:k]].tolist())",
           "chosen.update(order[np.flatnonzero(ranked[:, column])[: k + 1]].tolist())", DATA,
           "K-shot draws K+1 per class"),
    Mutant("splits-no-stratify", "fastprompt/data/splits.py",
           "stratify = array if array.ndim == 1 else None", "stratify = None", DATA,
           "train/val split not stratified"),
    Mutant("transforms-crop-pct-inverted", "fastprompt/data/transforms.py",
           "int(s / crop_pct) for s in size", "int(s * crop_pct) for s in size", DATA,
           "eval crop_pct resizes smaller instead of larger"),
    Mutant("transforms-hflip-is-vflip", "fastprompt/data/transforms.py",
           "steps.append(v2.RandomHorizontalFlip(hflip))", "steps.append(v2.RandomVerticalFlip(hflip))", DATA,
           "hflip flips vertically"),
    Mutant("transforms-fpt-scale", "fastprompt/data/transforms.py",
           '"fpt": {"scale": (0.8, 1.0)', '"fpt": {"scale": (0.08, 1.0)', DATA,
           "FPT preset crops as small as EPT's"),
    Mutant("datasets-verify-keeps-broken", "fastprompt/data/datasets.py",
           "self.samples = [sample for sample, reason in zip(self.samples, reasons) if reason is None]", "pass",
           DATA, "verify() reports but keeps unreadable images"),
    Mutant("datasets-no-next-readable", "fastprompt/data/datasets.py",
           "path, target = self.samples[(index + offset) % len(self)]",
           "path, target = self.samples[index % len(self)]", DATA,
           "an unreadable sample is not replaced by the next readable one"),
    Mutant("images-monochrome1-not-inverted", "fastprompt/data/images.py", "unit = 1.0 - unit", "unit = unit", DATA,
           "MONOCHROME1 DICOM shown with inverted brightness"),
    Mutant("cache-no-checksum", "fastprompt/data/cache.py",
           'if set(tensors) != set(FEATURE_NAMES) or _checksum(tensors) != metadata.get("sha256"):',
           "if set(tensors) != set(FEATURE_NAMES):", CACHE, "corrupted cache entries load"),
    Mutant("cache-no-key-check", "fastprompt/data/cache.py",
           'if metadata.get("key") != key or metadata.get("format") != CACHE_FORMAT:',
           'if metadata.get("format") != CACHE_FORMAT:', CACHE, "an entry written for another key loads"),
    # ---- kernels
    Mutant("sink-dg-sign", "kernels/sink_attention.py",
           "dg = -_sink_weight(g, lse_p) * delta.to(g.dtype)", "dg = _sink_weight(g, lse_p) * delta.to(g.dtype)",
           SINK, "sink gradient with the wrong sign"),
    Mutant("sink-weight-inf-nan", "kernels/sink_attention.py",
           "return torch.where(g == lse_p, torch.ones_like(g), torch.exp(g - lse_p))", "return torch.exp(g - lse_p)",
           SINK, "an infinite sink gives NaN gradients"),
    Mutant("sink-row-delta-fake-dtype", "kernels/sink_attention.py",
           "return out.new_empty(out.shape[:-1], dtype=torch.promote_types(out.dtype, torch.float32))",
           "return out.new_empty(out.shape[:-1])", SINK, "fake row delta in fp16/bf16 instead of fp32"),
    Mutant("importance-cls-all-rows", "kernels/importance.py",
           'return float(scale), q.shape[2] if mode == "global" else 1', "return float(scale), q.shape[2]",
           IMPORTANCE, "'cls' mode averages every query row"),
    Mutant("importance-sum-not-mean", "kernels/importance.py", "    return total / rows", "    return total",
           IMPORTANCE, "global scores summed, not averaged"),
    # ---- kernel tuning keys and tail masks (issue 24)
    Mutant("tuning-key-exact-n", "kernels/sink_attention_triton.py", 'KEY = ["N_Q_BUCKET", "N_K_BUCKET", "D"]',
           'KEY = ["N_Q", "N_K", "D"]', TUNING, "every resolution re-tunes every kernel (exact N in the key)"),
    Mutant("tuning-bucket-specialised", "kernels/sink_attention_triton.py",
           '@triton.jit(do_not_specialize=["N_Q_BUCKET", "N_K_BUCKET"])\ndef _forward_kernel(',
           "@triton.jit\ndef _forward_kernel(", SM90_BUCKET,
           "a bucket that is a multiple of 16 compiles the forward again (Triton specialises it)"),
    Mutant("even-forced", "kernels/sink_attention_triton.py", "return args[size] % args[block] == 0", "return True",
           TUNING, "ragged sizes take the unmasked even path"),
    Mutant("even-never", "kernels/sink_attention_triton.py", "return args[size] % args[block] == 0",
           "return False", TUNING + SM90_EVEN, "even sizes keep every tail mask"),
    Mutant("ragged-load-unmasked", "kernels/sink_attention_triton.py",
           "tile = tl.load(ptrs, mask=tile_mask(idx_ok, dim_ok, EVEN_ROWS, EVEN_D), other=0.0)",
           "tile = tl.load(ptrs)", TUNING, "ragged tiles load past the last token and the head dim"),
    Mutant("ragged-head-dim-unmasked", "kernels/sink_attention_triton.py",
           "mask = idx_ok[:, None] & dim_ok[None, :]", "mask = idx_ok[:, None]", TUNING,
           "a padded head dim (80 → 128) reads and writes the padding when the tokens are ragged too"),
    Mutant("forward-padded-keys-kept", "kernels/sink_attention_triton.py",
           's = tl.where(key_ok[None, :], s, float("-inf"))', "s = s", TUNING,
           "the forward's padded keys take softmax mass"),
    Mutant("importance-padded-rows-summed", "kernels/importance_triton.py",
           "p = tl.where(mask_m[:, None], p, 0.0)", "p = p", TUNING, "padded query rows add to every column mass"),
    # ---- benchmarks/gpu.py
    Mutant("gpu-identical-any", "benchmarks/gpu.py",
           "identical = float(all(checks)) if checks else None", "identical = float(any(checks)) if checks else None",
           GPU, "determinism goal met when one check of several is identical"),
    Mutant("gpu-agreement-constant", "benchmarks/gpu.py",
           "agree = float((fused.sort(dim=-1).values == reference.sort(dim=-1).values).float().mean())",
           "agree = 1.0", GPU, "frozen-forward index agreement never compared"),
    Mutant("gpu-speedup-inverted", "benchmarks/gpu.py",
           'speedup = rows[1]["time_seconds"]["median"] / rows[0]["time_seconds"]["median"]',
           'speedup = rows[0]["time_seconds"]["median"] / rows[1]["time_seconds"]["median"]', GPU,
           "frozen-forward speed-up inverted"),
]  # fmt: skip
