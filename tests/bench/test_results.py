"""Committed results stay in sync: every committed result file loads in the suite schema, names the script in this
repository that wrote it and comes from a clean tree; docs/benchmarks.md's results section is what `python -m
benchmarks.report` renders from them; the recorded commit and dirty flag are right from a git worktree too."""

from __future__ import annotations

import datetime
import difflib
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest

from benchmarks import report, results

# Committed results measured from a dirty tree (none now): a file may only leave this list, re-measured from a clean
# worktree with the command it records. Never add to it.
MEASURED_FROM_A_DIRTY_TREE: set[str] = set()


def git(*args: str, cwd: Path = results.REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60).stdout


def in_git_checkout() -> bool:
    try:
        return git("rev-parse", "--is-inside-work-tree").strip() == "true"
    except (OSError, subprocess.SubprocessError):
        return False


needs_git = pytest.mark.skipif(not in_git_checkout(), reason="needs the git checkout (committed files, worktrees)")


def committed_result_files() -> list[Path]:
    listed = git("ls-files", "-z", "--", "*.json", cwd=results.RESULTS_DIR).split("\0")
    return sorted(results.RESULTS_DIR / name for name in listed if name)


@needs_git
def test_every_committed_result_file_loads_in_the_suite_schema():
    files = committed_result_files()
    assert files, "no committed result files found"
    problems = []
    for path in files:
        name = path.relative_to(results.RESULTS_DIR).as_posix()
        try:
            record = results.load_record(path)
        except (ValueError, OSError) as error:
            problems.append(f"{name}: {error}")
            continue
        if not re.fullmatch(r"[0-9a-f]{40}", str(record["git_commit"])):
            problems.append(f"{name}: git_commit {record['git_commit']!r} is not a commit")
        try:
            datetime.datetime.fromisoformat(record["date"])
        except (TypeError, ValueError):
            problems.append(f"{name}: date {record['date']!r} is not ISO 8601")
        if not isinstance(record["versions"], dict) or "torch" not in record["versions"]:
            problems.append(f"{name}: versions must name at least torch")
        if not isinstance(record["git_dirty"], bool):
            problems.append(f"{name}: git_dirty must be true or false, got {record.get('git_dirty')!r}")
        if "script" in record:
            problems.append(f"{name}: embeds a script; record the command of a script in benchmarks/ instead")
        if record["git_dirty"] and name not in MEASURED_FROM_A_DIRTY_TREE:
            problems.append(f"{name}: measured from a dirty tree; measure in a clean worktree (git worktree add)")
        problems += command_problems(name, record["command"])
    assert not problems, "\n".join(problems)


def command_problems(name: str, command: str) -> list[str]:
    """The recorded command runs a script of this repository: `[VAR=value ...] python -m <module> ...` with <module>
    in the repository, or `[VAR=value ...] python <path> ...` with <path> a file of the repository."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # environment assignments
    root = results.REPO_ROOT.resolve()
    if len(words) >= 3 and words[1] == "-m":
        spec = importlib.util.find_spec(words[2])
        origin = Path(spec.origin).resolve() if spec and spec.origin else None
        if origin is None or not origin.is_relative_to(root):
            return [f"{name}: command runs {words[2]!r}, which is not a module of this repository"]
        return []
    if len(words) >= 2 and words[1].endswith(".py"):
        if not (root / words[1]).is_file():
            return [f"{name}: command runs {words[1]!r}, which is not a file of this repository"]
        return []
    return [f"{name}: command {command!r} is neither `python -m <module> ...` nor `python <script>.py ...`"]


@needs_git
def test_every_committed_result_names_a_commit_of_this_history():
    """A result's git_commit must be a commit this checkout has (`git cat-file -e <sha>^{commit}`): a made-up or
    foreign hash would make the record unverifiable."""
    if git("rev-parse", "--is-shallow-repository").strip() == "true":
        pytest.skip("a shallow clone lacks the older commits; run in a full clone")
    missing = []
    for path in committed_result_files():
        commit = str(json.loads(path.read_text()).get("git_commit"))
        found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=results.REPO_ROOT,
                               capture_output=True, timeout=60)  # fmt: skip
        if found.returncode != 0:
            missing.append(f"{path.relative_to(results.RESULTS_DIR).as_posix()}: {commit}")
    assert not missing, "git_commit not in this repository's history:\n" + "\n".join(missing)


@needs_git
def test_the_dirty_list_names_only_committed_dirty_files():
    """Once a file is re-measured from a clean tree, it must leave MEASURED_FROM_A_DIRTY_TREE."""
    dirty = set()
    for path in committed_result_files():
        try:
            if results.load_record(path)["git_dirty"]:
                dirty.add(path.relative_to(results.RESULTS_DIR).as_posix())
        except ValueError:
            continue
    assert sorted(MEASURED_FROM_A_DIRTY_TREE - dirty) == []


@needs_git
def test_benchmarks_page_results_section_is_what_the_report_renders():
    """`python -m benchmarks.report` over the committed files gives exactly docs/benchmarks.md's section between the
    markers (plots named as the report names them, rendered here into a scratch folder)."""
    records, _ = report.load_results(results.RESULTS_DIR, committed_only=True)
    with tempfile.TemporaryDirectory() as scratch:
        written = report.render_plots(records, Path(scratch))
    plots = [results.RESULTS_DIR / "plots" / path.name for path in written]
    readme = results.MARKDOWN
    expected = report.render_markdown(records, readme.parent, plots)
    text = readme.read_text(encoding="utf-8")
    assert text.count(report.START) == 1 and text.count(report.END) == 1, f"{readme} needs one pair of result markers"
    current = text.split(report.START, 1)[1].split(report.END, 1)[0].strip("\n")
    if current != expected:
        diff = "".join(
            difflib.unified_diff(current.splitlines(True), expected.splitlines(True), readme.name, "benchmarks.report")
        )
        pytest.fail(f"{readme.name}'s results section is out of date; run python -m benchmarks.report\n{diff[:6000]}")
    missing = [path.name for path in plots if not path.is_file()]
    assert not missing, f"plots the README shows are not committed: {missing}; run python -m benchmarks.report"
    committed = {Path(name).name for name in git("ls-files", "--", "plots", cwd=results.RESULTS_DIR).split()}
    stale = sorted(committed - {path.name for path in plots})
    assert not stale, f"committed plots the report no longer draws: {stale}; git rm them"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_from_another_checkout_marks_the_record_dirty(monkeypatch, tmp_path):
    """A clean checkout whose record would be written while this process runs fastprompt from elsewhere: dirty."""
    fake = types.ModuleType("fastprompt._elsewhere")
    fake.__file__ = "/somewhere/else/fastprompt/_elsewhere.py"
    monkeypatch.setitem(sys.modules, "fastprompt._elsewhere", fake)
    assert "fastprompt._elsewhere (/somewhere/else/fastprompt/_elsewhere.py)" in results.modules_outside(
        results.REPO_ROOT
    )
    checkout = tmp_path / "checkout"  # clean, and none of the loaded fastprompt modules come from it
    (checkout / "benchmarks" / "results").mkdir(parents=True)
    (checkout / "README.md").write_text("x\n")
    git("init", "-q", cwd=checkout)
    git("add", ".", cwd=checkout)
    git("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-qm", "x", cwd=checkout)
    monkeypatch.setattr(results, "REPO_ROOT", checkout)
    monkeypatch.setattr(results, "RESULTS_DIR", checkout / "benchmarks" / "results")
    with pytest.warns(RuntimeWarning, match="code from outside .* marked dirty"):
        recorded = results.git_commit()
    assert recorded["commit"] == git("rev-parse", "HEAD", cwd=checkout).strip() and recorded["dirty"] is True


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_and_dirty_flag_recorded_from_a_git_worktree(tmp_path):
    """This checkout's code, committed to a scratch repository and run from a worktree of it: the record names the
    commit with dirty = false, also after a result file was rewritten there (an output, not code); a change to any
    other tracked file makes it dirty, and so does running the kernels of another checkout (what an editable install
    serves a worktree unless fastprompt/kernels links to ../kernels)."""
    repo, tree = tmp_path / "repo", tmp_path / "wt"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "plots")
    for folder in ("fastprompt", "kernels", "benchmarks"):
        shutil.copytree(results.REPO_ROOT / folder, repo / folder, ignore=ignore)
    (repo / "README.md").write_text("scratch\n")
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    git("init", "-q", cwd=repo)
    git("add", ".", cwd=repo)
    git(*identity, "commit", "-q", "-m", "scratch", cwd=repo)
    git("worktree", "add", "-q", "--detach", str(tree), "HEAD", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo).strip()
    probe = (  # each argument: an action, or 'record' (print what a result record would say now)
        "import json, pathlib, sys, warnings; warnings.simplefilter('ignore')\n"
        "for action in sys.argv[1:]:\n"
        "    if action == 'kernels': import fastprompt.kernels\n"
        "    if action == 'result':\n"
        "        path = next(pathlib.Path('benchmarks/results').rglob('*.json'))\n"
        "        path.write_text(path.read_text() + ' ')\n"
        "    if action == 'readme': pathlib.Path('README.md').write_text('changed')\n"
        "    if action == 'record':\n"
        "        from benchmarks import results\n"
        "        kernels = getattr(sys.modules.get('fastprompt.kernels'), '__file__', None)\n"
        "        print(json.dumps({**results.git_commit(), 'file': results.__file__, 'kernels': kernels}))\n"
    )

    def recorded(*actions: str) -> list[dict]:
        env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        done = subprocess.run(
            [sys.executable, "-c", probe, *actions], cwd=tree, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]

    clean, with_kernels = recorded("record", "kernels", "record")
    assert Path(clean["file"]).resolve().is_relative_to(tree.resolve())
    assert clean["commit"] == head and clean["dirty"] is False
    outside = not Path(with_kernels["kernels"]).resolve().is_relative_to(tree.resolve())  # an install serves them
    assert with_kernels["dirty"] is outside
    if not (tree / "fastprompt" / "kernels").exists():
        (tree / "fastprompt" / "kernels").symlink_to(Path("..") / "kernels")  # untracked: not a change
    linked, result_rewritten, readme_changed = recorded("kernels", "record", "result", "record", "readme", "record")
    assert Path(linked["kernels"]).resolve().is_relative_to(tree.resolve())
    assert linked["dirty"] is False and result_rewritten["dirty"] is False
    assert readme_changed["dirty"] is True and readme_changed["commit"] == head
