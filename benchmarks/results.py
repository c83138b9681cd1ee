"""Result files: one JSON per run under benchmarks/results/<device>/, with provenance, written atomically."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fastprompt.cli.common import unused_path
from fastprompt.io import atomic_write_bytes

SCHEMA = "fastprompt-bench/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = RESULTS_DIR.parent.parent
MARKDOWN = REPO_ROOT / "docs" / "benchmarks.md"  # the page whose results block benchmarks.report renders
REQUIRED_KEYS = (
    "schema",
    "suite",
    "device",
    "device_type",
    "versions",
    "git_commit",
    "date",
    "command",
    "config",
    "rows",
)
VERSIONED_PACKAGES = ("torch", "timm", "triton", "numpy", "xformers", "deepspeed")
COMMIT_ENV = "FASTPROMPT_COMMIT"  # the clean commit a tree without .git is (benchmarks.gpu --commit sets it)


def device_name(device: torch.device | str) -> str:
    """A human-readable name of `device`: the GPU's name, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.MULTILINE)
        if match:
            model = match.group(1).strip()
    return f"{model} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores)"


def library_versions() -> dict[str, str | None]:
    """Versions of python and the libraries a benchmark depends on (None when not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    versions["cuda"] = torch.version.cuda
    return versions


def git_commit() -> dict[str, Any]:
    """The repository's HEAD commit and whether the work tree had uncommitted changes (outside benchmarks/results/,
    which holds outputs: writing one result must not mark the next run of the same checkout dirty). Without git
    (a copied tree), the commit named by $FASTPROMPT_COMMIT, taken as clean.

    Also dirty when a loaded fastprompt/benchmarks module comes from outside this tree (e.g. a run from a git
    worktree whose `fastprompt.kernels` the editable install of another checkout supplies): the commit would not
    describe the code that ran.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        outputs = f":(exclude){RESULTS_DIR.relative_to(REPO_ROOT).as_posix()}"
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", outputs)
        commit, dirty = git("rev-parse", "HEAD"), bool(changed)
    except (OSError, subprocess.SubprocessError):  # no git, or a copied tree without .git: the commit it was told
        told = os.environ.get(COMMIT_ENV) or None
        return {"commit": told, "dirty": False if told else None}
    foreign = modules_outside(REPO_ROOT)
    if foreign:
        warnings.warn(
            f"code from outside {REPO_ROOT} ran: {', '.join(foreign[:3])}; the record is marked dirty. Run from the "
            "checkout whose code is imported (in a git worktree of an editable install, link fastprompt/kernels to "
            "../kernels)",
            RuntimeWarning,
            stacklevel=2,
        )
    return {"commit": commit, "dirty": dirty or bool(foreign)}


def modules_outside(root: Path) -> list[str]:
    """Loaded fastprompt/benchmarks modules whose file is not under `root`, as 'name (file)'."""
    root = root.resolve()
    found = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (
            name.split(".")[0] in ("fastprompt", "benchmarks")
            and path
            and not Path(path).resolve().is_relative_to(root)
        ):
            found.append(f"{name} ({path})")
    return sorted(found)


def run_record(
    suite: str,
    device: torch.device | str,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """A complete result record: provenance, the run's configuration, its rows and notes."""
    commit = git_commit()
    return {
        "schema": SCHEMA,
        "suite": suite,
        "device": device_name(device),
        "device_type": torch.device(device).type,
        "versions": library_versions(),
        "git_commit": commit["commit"],
        "git_dirty": commit["dirty"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(arg) for arg in [Path(sys.executable).name, "-m", *command_args()]),
        "config": config,
        "rows": rows,
        "notes": notes or [],
    }


def command_args() -> list[str]:
    """The module name and arguments this process was started with (`python -m <module> ...`)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    module = spec.name if spec is not None else Path(sys.argv[0]).name
    if module.endswith(".__main__"):
        module = module[: -len(".__main__")]
    return [module, *sys.argv[1:]]


def default_output_dir() -> Path:
    """Where runs go unless told otherwise: ./benchmark-results under the current directory (never the repository's
    committed benchmarks/results/, which a run joins only through an explicit --output benchmarks/results)."""
    return Path.cwd() / "benchmark-results"


def default_path(record: dict[str, Any], stem: str, root: str | os.PathLike | None = None) -> Path:
    """Where a record is written: <root, default ./benchmark-results>/<device>/<stem>.json."""
    return Path(root if root is not None else default_output_dir()) / record_device_dir(record) / f"{stem}.json"


def record_device_dir(record: dict[str, Any]) -> str:
    """The results sub-folder for a record's device name."""
    if record["device_type"] != "cuda":
        return record["device_type"]
    return re.sub(r"[^a-z0-9]+", "-", record["device"].lower()).strip("-")


def write_record(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Validate `record` and write it to `path` atomically as indented JSON; return the path."""
    validate_record(record)
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False) + "\n").encode())
    return path


def save_suite_run(
    suite: str, device: torch.device | str, args: Any, rows: list[dict[str, Any]], notes: list[str], stem: str
) -> Path:
    """Write a suite run (config: its command-line `args` less `output`) to `args.output`: a .json file, or a folder
    that gets <device>/<stem>.json (e.g. benchmarks/results); by default ./benchmark-results/<device>/<stem>.json.
    An existing file is never replaced: the run goes to <stem>-2.json, -3, ... (the report takes the newest)."""
    config = {key: value for key, value in vars(args).items() if key != "output"}
    record = run_record(suite, device, config, rows, notes)
    output = args.output
    if output is None or Path(output).suffix.lower() != ".json":
        output = default_path(record, stem, output)
    path = write_record(record, unused_path(Path(output)))  # never overwrite: <stem>-2.json, -3, ... (newest wins)
    print(f"wrote {path}")
    return path


def validate_record(record: object) -> dict[str, Any]:
    """Raise a ValueError unless `record` has this schema and every required key; return it."""
    if not isinstance(record, dict):
        raise ValueError(f"a result record must be a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"result record is missing required key(s) {missing}; write it with benchmarks.results")
    if record["schema"] != SCHEMA:
        raise ValueError(f"result record has schema {record['schema']!r}; this reader understands {SCHEMA!r}")
    if not isinstance(record["rows"], list) or not all(isinstance(row, dict) for row in record["rows"]):
        raise ValueError("result record 'rows' must be a list of objects")
    return record


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate one result file."""
    with open(path, encoding="utf-8") as handle:
        return validate_record(json.load(handle))
