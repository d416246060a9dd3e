"""Run torch-pruning's own test suite (tests/ at a tag, v1.6.1 by default) with fxgndi's
GNDIImportance in place of every importance it constructs, assertions unchanged.

    PYTHONPATH=$PWD python scripts/tp_suite.py [--dest /tmp/tp161] [--timeout 300] [FILE ...]

What it does, outside the project (nothing is copied into fxgndi):

1. ``git archive <tag> tests`` of torch-pruning's repository into ``--dest``.
2. Rewrites each test file: every construction ``tp.importance.XImportance(...)`` and every
   importance class listed as a value (``[tp.importance.GroupMagnitudeImportance,
   tp.pruner.GroupNormPruner]``, constructed later) becomes ``_gndi_sub.XImportance``, a
   ``GNDIImportance`` with the default readout; ``isinstance`` / ``==`` checks against the
   built-ins are left as they are (so a test's Taylor / Hessian gradient bookkeeping is not
   run for G-NDI, which needs none). The constructor keeps the test's ``normalizer`` and
   ``group_reduction`` (the options GNDIImportance shares with torch-pruning's importances)
   and drops the rest (``p`` of a weight norm, ``bias``, ...). ``pretrained=True`` becomes
   ``pretrained=False``: this machine cannot download weights (no assertion reads them).
3. GNDIImportance reads data: the harness's conftest records the ``example_inputs`` of every
   ``DependencyGraph.build_dependency`` (the pruners call it too), and the substitute, on its
   first call, scores on one batch of random data of that shape (seeded ``randn`` of each
   tensor's shape, the same for every importance of a test; a tuple or dict of inputs
   stays a tuple or dict).
4. Runs each file alone (``timeout`` seconds, ``OMP_NUM_THREADS=1``) and prints
   ``file | passed | failed | seconds | cause`` (the first error line of the first failure,
   or ``timeout``), also written to ``<dest>/table.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = "/work/.mirror/VainF+Torch-Pruning/repo"

SUBSTITUTE = '''"""GNDIImportance for torch-pruning's importances (written by tp_suite.py)."""
import torch
from fxgndi.pruning.importance import GNDIImportance
from fxgndi.pruning._tp import graph_of

EXAMPLES = {}  # id(dependency graph) -> the example_inputs it was built on


def _like(example, generator):
    """Random data of the example's shapes, the same for every importance of one test."""
    if isinstance(example, torch.Tensor):
        if not example.is_floating_point():
            return example.clone()
        noise = torch.randn(example.shape, generator=generator, dtype=example.dtype)
        return noise.to(example.device)
    if isinstance(example, dict):
        return {k: _like(v, generator) for k, v in example.items()}
    if isinstance(example, (list, tuple)):
        return type(example)(_like(v, generator) for v in example)
    return example


class _Substitute(GNDIImportance):
    def __init__(self, *args, **kwargs):
        keep = {k: kwargs[k] for k in ("normalizer", "group_reduction") if k in kwargs}
        super().__init__(None, **keep)

    def __call__(self, group, *args, **kwargs):
        if self.data is None:
            example = EXAMPLES[id(graph_of(group))]
            self.data = [_like(example, torch.Generator().manual_seed(0))]
        return super().__call__(group)


def __getattr__(name):
    if name.endswith("Importance"):
        return type(name, (_Substitute,), {})
    raise AttributeError(name)
'''

CONFTEST = '''import torch_pruning as tp
import _gndi_sub

_build = tp.DependencyGraph.build_dependency


def _recording(self, model, example_inputs, *args, **kwargs):
    _gndi_sub.EXAMPLES[id(self)] = example_inputs
    return _build(self, model, example_inputs, *args, **kwargs)


tp.DependencyGraph.build_dependency = _recording
'''

# a construction, or a class given as a value in a list / tuple (followed by , or ])
CONSTRUCTION = re.compile(r"\btp\.importance\.(\w*Importance)\b(?=\s*[(,\]])")


def extract(dest: Path, tag: str, repo: str) -> list[Path]:
    """Torch-pruning's tests at ``tag`` in ``dest/tests``, rewritten (see the module doc)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", repo, "archive", tag, "tests"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    tests = dest / "tests"
    (tests / "_gndi_sub.py").write_text(SUBSTITUTE)
    (tests / "conftest.py").write_text(CONFTEST)
    files = sorted(tests.glob("test_*.py"))
    for f in files:
        text = CONSTRUCTION.sub(r"_gndi_sub.\1", f.read_text())
        text = text.replace("pretrained=True", "pretrained=False")
        if "_gndi_sub." in text:
            text = "import _gndi_sub\n" + text
        f.write_text(text)
    return files


def run_file(path: Path, timeout: int, worktree: str) -> tuple[int, int, float, str]:
    """(passed, failed, seconds, cause) of one test file run alone."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": worktree}
    start = time.perf_counter()
    proc = subprocess.run(["timeout", str(timeout), sys.executable, "-m", "pytest", "-q",
                           "-p", "no:cacheprovider", path.name],
                          cwd=path.parent, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    (path.parent / f"{path.stem}.log").write_text(out)
    passed = sum(int(n) for n in re.findall(r"(\d+) passed", out[-2000:]))
    failed = sum(int(n) for n in re.findall(r"(\d+) (?:failed|error)", out[-2000:]))
    if proc.returncode == 124:
        return passed, failed, seconds, "timeout"
    cause = ""
    if failed or proc.returncode not in (0, 5):
        errors = [line[1:].strip() for line in out.splitlines() if line.startswith("E ")]
        cause = errors[0] if errors else f"exit {proc.returncode}"
    return passed, failed, seconds, cause[:140]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="test files to run (default: all)")
    parser.add_argument("--dest", default="/tmp/tp161")
    parser.add_argument("--tag", default="v1.6.1")
    parser.add_argument("--repo", default=REPO)
    parser.add_argument("--timeout", type=int, default=300)
    args = parser.parse_args()
    worktree = str(Path(__file__).resolve().parents[1])
    files = extract(Path(args.dest), args.tag, args.repo)
    if args.files:
        files = [f for f in files if f.name in args.files or f.stem in args.files]
    rows = ["| file | passed | failed | seconds | cause |", "|---|---|---|---|---|"]
    print(rows[0], flush=True)
    for f in files:
        passed, failed, seconds, cause = run_file(f, args.timeout, worktree)
        uses = "_gndi_sub." in f.read_text()
        row = (f"| {f.name}{'' if uses else ' (no importance)'} | {passed} | {failed} | "
               f"{seconds:.0f} | {cause.replace('|', '/')} |")
        rows.append(row)
        print(row, flush=True)
    Path(args.dest, "table.md").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
