"""Print ben2q's runtime requirements from pyproject.toml, one a line (build helper).

The images install these before the source is copied in, so that a source change does not
reinstall the dependencies (docker/Dockerfile, stage ``requirements``)::

    python requirements.py pyproject.toml [EXTRA[,EXTRA...]] > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: str = "") -> list[str]:
    """``[project].dependencies`` plus those of the named optional extras."""
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in (e.strip() for e in extras.split(",")):
        if not extra:
            continue
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        reqs += optional[extra]
    return reqs


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")))
