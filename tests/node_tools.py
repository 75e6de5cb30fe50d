"""Finding the real Kubernetes node tools (crictl, kubelet) a test drives.

Looked up as /work/shared/bin/README.md says: `$PYRIO_<TOOL>`, then
`../shared/bin/<tool>` relative to the project (for a git worktree, relative
to its main checkout too), then PATH. A test without the tool skips, naming
where it looked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.harness import REPO


def _project_roots() -> list[Path]:
    roots = [REPO]
    git = REPO / ".git"
    if git.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        gitdir = Path(git.read_text().split(":", 1)[1].strip())
        roots.append(gitdir.parents[2])
    return roots


def find_tool(name: str) -> str:
    """The tool's path, or pytest.skip saying where it was looked for."""
    variable = f"PYRIO_{name.upper()}"
    candidates = [os.environ.get(variable, "")] + [str(root.parent / "shared" / "bin" / name) for root in _project_roots()]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return found
    pytest.skip(f"{name} not found (${variable}, {', '.join(candidates[1:])}, PATH)")
