"""Every code block in README.md and docs/*.md runs.

Per markdown file, the blocks run in order in one fresh working folder (so a block may use
what an earlier block of the same file wrote), which holds links to the checkout's
``configs/`` and ``vargen/`` so repository paths such as ``configs/nar_scenes_cpu.json``
and ``vargen/weights/scenes-t2i/vq`` resolve as they do from the repository root:

- ```python blocks are executed, all blocks of a file in one namespace (like a notebook);
- ```bash / ```sh / ```console blocks: every command (``\\``-continued lines joined, ``# ...``
  comments and, in console blocks, lines without a ``$ `` prompt skipped) must be a
  ``vargen ...`` command; it goes through ``vargen.cli.main`` and must return 0;
- a block whose info string says ``no-test`` is not run, and the line above it must say
  why, visibly: ``Not run by the docs test: <reason>``.

Also: README.md has at most 250 lines, and no README/docs file points outside the
repository (``../shared`` and friends).
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(`{3,})(.*)$")
NO_TEST_REASON = re.compile(r"not run by the docs test: \S.{5,}", re.IGNORECASE)
OUTSIDE = re.compile(r"\.\./shared|/work/|/path/to/|/home/|/tmp/|~/")


def code_blocks(path: Path) -> list:
    """``[(line, lang, info words, text, text of the line above)]`` of every fenced block in ``path``."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).split()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        above = next((lines[j] for j in range(start - 2, -1, -1) if lines[j].strip()), "")
        blocks.append((start, info[0] if info else "", info[1:], "\n".join(body), above))
        i += 1
    return blocks


def shell_commands(text: str, console: bool) -> list:
    """The commands of a shell block: continuations joined, comments and (console) output lines dropped."""
    commands, current = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not current:
            if console:
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        commands.append(current + line)
        current = ""
    if current:
        commands.append(current)
    return commands


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cli(command: str) -> int:
    from vargen.cli import main

    argv = shlex.split(command, comments=True)
    if argv and argv[0] in ("vargen", ".venv/bin/vargen"):
        argv = argv[1:]
    else:
        raise AssertionError(f"only `vargen ...` commands can run in a tested block, got {command!r}; "
                             "mark the block `no-test` with a reason")
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code if isinstance(e.code, int) else 1


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


def test_docs_exist():
    for name in ("methods", "models", "benchmarks", "design", "training"):
        assert (ROOT / "docs" / f"{name}.md").is_file(), f"docs/{name}.md is missing"


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_code_blocks_run(path, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("configs", "vargen"):
        (work / name).symlink_to(ROOT / name)
    (work / "outputs").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    namespace = {"__name__": "__docs__"}
    ran = 0
    for line, lang, flags, text, above in code_blocks(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        if "no-test" in flags:
            assert NO_TEST_REASON.search(above), (
                f"{where}: a no-test block needs a visible reason on the line above it "
                "('Not run by the docs test: <reason>')")
            continue
        if lang == "python":
            with one_thread():
                try:
                    exec(compile(text, where, "exec"), namespace)
                except Exception as e:
                    raise AssertionError(f"{where}: python block failed: {type(e).__name__}: {e}") from e
            ran += 1
        elif lang in SHELL:
            for command in shell_commands(text, console=lang == "console"):
                with one_thread():
                    rc = run_cli(command)
                assert rc == 0, f"{where}: `{command}` exited with {rc}"
            ran += 1
        elif lang not in ("", "text", "json", "markdown", "md"):
            raise AssertionError(f"{where}: code block language {lang!r} is neither run nor allowed")


def test_readme_is_a_front_page():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 250, f"README.md has {n} lines; move detail into docs/"


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_no_paths_outside_the_repository(path):
    for i, line in enumerate(path.read_text().splitlines(), 1):
        m = OUTSIDE.search(line)
        assert not m, f"{path.relative_to(ROOT)}:{i} points outside the repository ({m.group(0)!r}): {line.strip()}"


@pytest.mark.parametrize("path", DOCS, ids=_ids(DOCS))
def test_links_resolve(path):
    """Relative links and images in the docs point at files that exist (docs/checkpoints.md and
    docs/reliability.md are written elsewhere and may not be in this checkout yet)."""
    pending = {"docs/checkpoints.md", "docs/reliability.md"}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            rel = resolved.relative_to(ROOT).as_posix() if resolved.is_relative_to(ROOT) else str(resolved)
            assert resolved.is_relative_to(ROOT), f"{path.relative_to(ROOT)}:{i}: {target} leaves the repository"
            assert resolved.exists() or rel in pending, f"{path.relative_to(ROOT)}:{i}: broken link {target}"
