"""The command line end to end on tiny image folders written by the tests, and every user error it explains."""

import hashlib
import json
import math
import runpy
import sys
import types

import numpy as np
import pytest
import torch
from helpers import CLASSES, FAST, TINY, write_image_folder
from PIL import Image
from timm.models import _builder

from fastprompt.cli import main
from fastprompt.engine import Engine
from fastprompt.models import create_backbone


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Training folder with one corrupt file, a validation folder, and a trained EPT run."""
    root = tmp_path_factory.mktemp("cli")
    train = write_image_folder(root / "train", 6)
    (train / CLASSES[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    val = write_image_folder(root / "val", 2, seed=1)
    clean = write_image_folder(root / "clean", 5, seed=2)
    return types.SimpleNamespace(root=root, train=train, val=val, clean=clean)


def ept_train_argv(data):
    out = data.root / "ept_run"
    argv = ["train", f"--data={data.train}", f"--val={data.val}", *TINY, "--method=ept", "--prompt-length=4"]
    return [*argv, *FAST, f"--output-dir={out}"], out


@pytest.fixture(scope="module")
def ept_run(data):
    """A trained EPT run (module-scoped: train once, evaluate and explain it in several tests)."""
    argv, out = ept_train_argv(data)
    assert main(argv) == 0
    return out


def run_error(capsys, argv):
    """Run a command that must fail as a user error; return its stderr."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_train_writes_the_run_and_skips_unreadable_images(ept_run, capsys):
    for name in ("config.json", "metrics.json", "metrics.jsonl", "curves.png", "backbone.safetensors"):
        assert (ept_run / name).is_file(), name
    assert (ept_run / "checkpoints" / "last.pt").is_file()
    config = json.loads((ept_run / "config.json").read_text())
    assert config["engine"]["class_names"] == list(CLASSES)
    assert config["method"] == "ept" and config["method_options"] == {"prompt_length": 4}
    assert config["train_size"] == 12 and config["val_size"] == 4  # broken.png dropped
    metrics = json.loads((ept_run / "metrics.json").read_text())
    history = [json.loads(line) for line in (ept_run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2
    # the classes are far-apart colours (mean 90 vs 170, noise 30): the run must learn, not merely finish
    assert metrics["acc"] >= 0.75 and metrics["auc"] >= 0.9, history  # chance: 0.5
    assert history[-1]["train_loss"] < history[0]["train_loss"], history


def test_resume_of_a_finished_run_rebuilds_the_same_model(ept_run, data):
    final = json.loads((ept_run / "metrics.json").read_text())
    argv, _ = ept_train_argv(data)
    assert main([*argv, "--resume"]) == 0  # nothing left to train: the run is rebuilt from its files and evaluated
    assert json.loads((ept_run / "metrics.json").read_text()) == final
    assert main(argv) == 2  # without --resume, a finished run is not overwritten


def test_unreadable_image_is_reported_with_a_count(data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", f"--data={data.train}", *TINY, "--method=linear", "--epochs=1", *FAST[1:], f"--output-dir={out}"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "broken.png" in err
    config = json.loads((out / "config.json").read_text())
    assert config["val_size"] + config["train_size"] == 12 and config["val_fraction"] == 0.2


def test_evaluate_rebuilds_the_trained_model(ept_run, data, tmp_path, capsys):
    output = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["evaluate", f"--checkpoint={ept_run / 'checkpoints' / 'last.pt'}", f"--data={data.val}",
                 f"--output={output}", "--workers=0", "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "acc" in printed and "auc" in printed
    evaluated = json.loads(output.read_text())
    final = json.loads((ept_run / "metrics.json").read_text())  # validation on the same folder, last epoch
    assert evaluated["acc"] == final["acc"]
    assert evaluated["loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_explain_writes_png_overlays(ept_run, data, tmp_path, capsys):
    images = [data.val / CLASSES[0] / "0.png", data.val / CLASSES[1] / "0.png"]
    out = tmp_path / "explain"
    assert main(["explain", f"--checkpoint={ept_run}", *map(str, images), f"--output-dir={out}", "--quiet"]) == 0
    written = sorted(out.glob("*.png"))
    assert len(written) == 2
    for path in written:
        with Image.open(path) as png:
            assert png.format == "PNG" and png.width > 200


def test_explain_errors(ept_run, data, tmp_path, capsys):
    broken = data.train / CLASSES[0] / "broken.png"
    err = run_error(capsys, ["explain", f"--checkpoint={ept_run}", str(broken), f"--output-dir={tmp_path}"])
    assert "cannot decode image" in err and "broken.png" in err
    out = tmp_path / "lora"
    argv = ["train", f"--data={data.train}", *TINY, "--method=lora", "--rank=2", *FAST, "--epochs=1"]
    assert main([*argv, f"--output-dir={out}"]) == 0
    image = str(data.val / CLASSES[0] / "0.png")
    assert main(["explain", f"--checkpoint={out}", image, f"--output-dir={tmp_path / 'lora-png'}", "--quiet"]) == 0
    assert len(list((tmp_path / "lora-png").glob("*.png"))) == 1  # LoRA: the attention received at the last layer


def test_fpt_preload_resume_train_from_cache_evaluate_explain(data, tmp_path, capsys, monkeypatch):
    from fastprompt.methods.fpt import FPT

    released = []
    release = FPT.release_backbone
    monkeypatch.setattr(FPT, "release_backbone", lambda self, **kw: released.append(self) or release(self, **kw))
    fpt = ["--method=fpt+", "--option", "side_input_size=16", "layers=[1]"]
    cache = tmp_path / "cache"
    preload = ["preload", f"--data={data.clean}", *TINY, *fpt, f"--cache={cache}", "--quiet"]
    assert main(preload) == 0
    entries = sorted(cache.glob("*/*.safetensors"))
    assert len(entries) == 10
    entries[0].unlink()  # an interrupted preload resumes: only the missing entry is computed
    stamps = {path: path.stat().st_mtime_ns for path in entries[1:]}
    assert main(preload) == 0
    assert len(list(cache.glob("*/*.safetensors"))) == 10
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())

    out = tmp_path / "fpt"
    train = ["train", f"--data={data.clean}", *TINY, *fpt, *FAST, "--epochs=1", f"--cache={cache}"]
    assert main([*train, f"--output-dir={out}"]) == 0
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())  # read, not recomputed
    assert len(list(cache.glob("*/*.safetensors"))) == 10
    assert len(released) == 1 and released[0].backbone_released  # training from the cache freed the backbone
    cached_metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= cached_metrics["acc"] <= 1.0

    # the checkpoint loads into the plain FPT model, which evaluates and explains from images
    assert main(["evaluate", f"--checkpoint={out}", f"--data={data.val}", "--workers=0", "--quiet"]) == 0
    image = str(data.val / CLASSES[1] / "1.png")
    assert main(["explain", f"--checkpoint={out}", image, f"--output-dir={tmp_path / 'png'}", "--quiet"]) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 1
    err = run_error(capsys, ["train", f"--data={data.clean}", *TINY, "--method=lora", *FAST, f"--cache={cache}",
                             f"--output-dir={tmp_path / 'lora'}"])  # fmt: skip
    assert "--cache holds FPT frozen-branch features" in err


def test_train_from_local_weights_file(data, tmp_path, capsys):
    torch.manual_seed(3)
    weights = tmp_path / "weights.pth"
    source = create_backbone("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2, patch_size=8)
    torch.save(source.state_dict(), weights)
    out = tmp_path / "run"
    argv = ["train", f"--data={data.clean}", *TINY, f"--checkpoint={weights}", "--method=bitfit", *FAST, "--epochs=1"]
    assert main([*argv, f"--output-dir={out}"]) == 0
    config = json.loads((out / "config.json").read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert config["weights"] == {"source": "file", "file": str(weights.resolve()), "sha256": digest}
    assert not (out / "backbone.safetensors").exists()

    copied = tmp_path / "copied"
    assert main([*argv, "--copy-weights", f"--output-dir={copied}"]) == 0
    copy = copied / "weights" / "weights.pth"
    assert json.loads((copied / "config.json").read_text())["weights"]["file"] == "weights/weights.pth"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest

    torch.manual_seed(4)  # the file changes after training: other weights under the same name
    torch.save(create_backbone("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2,
                               patch_size=8).state_dict(), weights)  # fmt: skip
    evaluate = ["evaluate", f"--data={data.val}", "--workers=0", "--quiet"]
    err = run_error(capsys, [*evaluate, f"--checkpoint={out}"])
    assert "the weight file" in err and "changed since training" in err and str(weights) in err
    image = str(data.val / CLASSES[0] / "0.png")
    err = run_error(capsys, ["explain", f"--checkpoint={out}", image, f"--output-dir={tmp_path / 'png'}"])
    assert "changed since training" in err
    assert main([*evaluate, f"--checkpoint={copied}"]) == 0  # the run's own copy is unaffected
    err = run_error(capsys, [*argv, "--epochs=2", f"--output-dir={out}", "--resume"])
    assert "is not the weight file this run started with" in err


def test_train_on_a_csv_list_few_shot(data, tmp_path):
    rows = ["path,label"] + [f"{path},{path.parent.name}" for path in sorted(data.clean.glob("*/*.png"))]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    argv = ["train", f"--data={tmp_path / 'list.csv'}", *TINY, "--method=linear", "--shots=2", "--seed=1", *FAST]
    assert main([*argv, f"--output-dir={out}"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["engine"]["class_names"] == list(CLASSES)
    assert (config["shots"], config["train_size"], config["val_size"]) == (2, 4, 2)


def test_few_shot_never_draws_the_validation_images(data, tmp_path, capsys):
    """5 images per class, 2 of them held out for validation: 3 remain, so 3-shot trains and 4-shot is refused (a
    draw from all 5 would leak validation images into training)."""
    argv = ["train", f"--data={data.clean}", *TINY, "--method=linear", "--val-fraction=0.4", *FAST, "--epochs=1"]
    assert main([*argv, "--shots=3", f"--output-dir={tmp_path / 'three'}"]) == 0
    config = json.loads((tmp_path / "three" / "config.json").read_text())
    assert (config["train_size"], config["val_size"]) == (6, 4)
    err = run_error(capsys, [*argv, "--shots=4", f"--output-dir={tmp_path / 'four'}"])
    assert "3 sample(s) outside the excluded set but 4-shot needs 4" in err


@pytest.mark.parametrize(
    "overrides, extra, message",
    [
        ({"data": "{absent}"}, [], "does not exist"),
        ({"data": "{one_class}"}, [], "at least two"),
        ({"img-size": "4"}, [], "smaller than one 8-pixel patch"),
        ({"img-size": "36"}, [], "not divisible by the 8-pixel patch"),
        ({"model": "vit_tiny_patch16"}, [], "unknown model 'vit_tiny_patch16'; did you mean"),
        ({"method": "nosuch"}, [], "unknown method 'nosuch'; valid methods"),
        ({}, ["--option", "no_such=1"], "unknown option(s) ['no_such'] for method 'linear'"),
        ({}, ["--option", "oops"], "--option expects key=value"),
        ({}, ["--rank=2"], "unknown option(s) ['rank'] for method 'linear'"),
    ],
)
def test_user_errors_give_one_message_and_exit_2(data, tmp_path, capsys, overrides, extra, message):
    one_class = write_image_folder(tmp_path / "one", 3)
    for path in (one_class / CLASSES[1]).iterdir():
        path.unlink()
    flags = {
        "data": str(data.clean),
        "model": "vit_tiny_patch16_224",
        "img-size": "32",
        "method": "linear",
        **overrides,
    }
    values = {key: value.format(absent=tmp_path / "absent", one_class=one_class) for key, value in flags.items()}
    argv = ["train", *(f"--{key}={value}" for key, value in values.items()), *TINY[1:-1], *extra, *FAST]
    err = run_error(capsys, [*argv, f"--output-dir={tmp_path / 'out'}"])
    errors = [line for line in err.splitlines() if line.startswith("fastprompt train: error:")]
    assert len(errors) == 1 and message in errors[0]


def test_images_smaller_than_a_patch_are_skipped_with_a_count(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "data", 3)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / CLASSES[0] / "tiny.png")
    argv = ["train", f"--data={folder}", *TINY, "--method=linear", *FAST, "--epochs=1", "--val-fraction=0.34"]
    assert main([*argv, f"--output-dir={tmp_path / 'out'}"]) == 0
    assert "skipped 1 image(s) smaller than one 8-pixel patch" in capsys.readouterr().err


def test_a_folder_of_only_too_small_images_is_refused(tmp_path, capsys):
    folder = tmp_path / "small"
    for name in CLASSES:
        (folder / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((40, 6, 3), np.uint8)).save(folder / name / f"{i}.png")  # 6 px wide < 8
    argv = ["train", f"--data={folder}", *TINY, "--method=linear", *FAST, f"--output-dir={tmp_path / 'out'}"]
    err = run_error(capsys, argv)
    assert f"every image in {folder} is smaller than one 8-pixel patch" in err


def test_pretrained_without_network(data, tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(_builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(_builder, "load_state_dict_from_url", offline)
    argv = ["train", f"--data={data.clean}", *TINY, "--pretrained", "--method=linear", *FAST]
    err = run_error(capsys, [*argv, f"--output-dir={tmp_path}"])
    assert "could not load the pretrained weights" in err and "--weights FILE" in err


def test_pretrained_with_an_unreachable_hub_fails_at_once(data, tmp_path, capsys, monkeypatch):
    import time

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    sleeps = []
    monkeypatch.setattr(_http.time, "sleep", sleeps.append)  # the hub's retry back-off, counted instead of slept
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    argv = ["train", f"--data={data.clean}", *TINY, "--pretrained", "--method=linear", *FAST]
    started = time.perf_counter()
    err = run_error(capsys, [*argv, f"--output-dir={tmp_path / 'run'}"])
    elapsed = time.perf_counter() - started
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "could not load the pretrained weights" in errors[0]
    assert "--weights FILE" in errors[0]
    assert sleeps == [], f"the hub retried {len(sleeps)} times"
    assert not (tmp_path / "run").exists()
    print(f"--pretrained without a network: failed in {elapsed:.2f} s")


@pytest.mark.parametrize("command", ["evaluate", "predict", "explain"])
def test_a_pretrained_run_read_without_a_network_fails_at_once(ept_run, data, tmp_path, capsys, monkeypatch, command):
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes((ept_run / "checkpoints" / "best.pt").read_bytes())
    config = json.loads((ept_run / "config.json").read_text())
    config["weights"] = {"source": "pretrained", "file": None}  # as trained with --pretrained
    (run / "config.json").write_text(json.dumps(config))
    sleeps = []
    monkeypatch.setattr(_http.time, "sleep", sleeps.append)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    image = str(data.val / CLASSES[0] / "0.png")
    argv = {
        "evaluate": ["evaluate", f"--checkpoint={run}", f"--data={data.val}", "--workers=0"],
        "predict": ["predict", f"--checkpoint={run}", "--data", image, f"--output={tmp_path / 'p.csv'}"],
        "explain": ["explain", f"--checkpoint={run}", image, f"--output-dir={tmp_path / 'png'}"],
    }[command]
    err = run_error(capsys, argv)
    assert "could not load the pretrained weights" in err
    assert sleeps == [], f"the hub retried {len(sleeps)} times"


@pytest.mark.parametrize(
    "error, message",
    [
        (torch.OutOfMemoryError("CUDA out of memory"), "lower --batch-size"),
        (FloatingPointError("loss is nan at step 3; last good checkpoint: last.pt"), "loss is nan at step 3"),
    ],
)
def test_training_failures_are_one_line_with_exit_1(data, tmp_path, capsys, monkeypatch, error, message):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(Engine, "fit", fail)
    argv = ["train", f"--data={data.clean}", *TINY, "--method=linear", *FAST, f"--output-dir={tmp_path}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_debug_shows_the_traceback(data, tmp_path):
    argv = ["train", f"--data={tmp_path / 'absent'}", *TINY, "--method=linear", *FAST, f"--output-dir={tmp_path}"]
    with pytest.raises(ValueError, match="does not exist"):
        main([*argv, "--debug"])


def test_bench_forwards_to_the_suite(tmp_path, monkeypatch, capsys):
    benchmarks = pytest.importorskip("benchmarks")
    (tmp_path / "echo_suite.py").write_text("def main(argv):\n    print('suite got', argv)\n    return 0\n")
    monkeypatch.setattr(benchmarks, "__path__", [*benchmarks.__path__, str(tmp_path)])
    assert main(["bench", "echo_suite", "--batch", "2"]) == 0
    assert "suite got ['--batch', '2']" in capsys.readouterr().out
    assert "unknown benchmark suite 'nosuch'" in run_error(capsys, ["bench", "nosuch"])
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # as installed from a wheel, without the repository
    assert "benchmarks package is not importable" in run_error(capsys, ["bench", "memory"])


def test_demo_runs_end_to_end_and_learns(tmp_path, capsys):
    argv = ["demo", f"--output-dir={tmp_path}", "--size=64", "--img-size=64"]
    assert main([*argv, "--images-per-class=20", "--epochs=15", "--quiet"]) == 0
    assert "acc" in capsys.readouterr().out
    assert len(list((tmp_path / "data").glob("*/*.png"))) == 60
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["acc"] >= 0.6, history  # three classes: chance is 1/3
    assert metrics["loss"] < math.log(3), history  # below the loss of a uniform guess
    assert history[-1]["train_loss"] < 0.85 * history[0]["train_loss"], history
    argv += ["--images-per-class=5", "--epochs=1"]
    assert main([*argv, "--quiet", "--method=linear"]) == 0  # a second demo in the same folder keeps the first
    assert (tmp_path / "run-2" / "metrics.json").is_file() and (tmp_path / "data-2").is_dir()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics


def test_python_dash_m_entry_point(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fastprompt", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("fastprompt", run_name="__main__")
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for command in ("train", "evaluate", "preload", "bench", "explain", "demo"):
        assert command in printed
