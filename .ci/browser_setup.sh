#!/usr/bin/env bash
# Installs what tests/test_browser.py needs, and nothing when it is already there (idempotent, ~1 s then):
#   - Debian's Chromium (/usr/bin/chromium), with apt-get (needs root, as in CI);
#   - the `browser` extra of pyproject.toml (voila, playwright), with pip into the active Python, pinned by
#     constraints.txt. Playwright's own browser download is never used: the test launches /usr/bin/chromium.
# Usage: bash .ci/browser_setup.sh   (run it with the project's venv on PATH, as .ci/test does)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [ -x /usr/bin/chromium ]; then
  echo "browser setup: chromium present ($(/usr/bin/chromium --version 2>/dev/null | head -1))"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "browser setup: installing chromium with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
  echo "browser setup: $(/usr/bin/chromium --version 2>/dev/null | head -1)"
else
  echo "browser setup: no /usr/bin/chromium and cannot apt-get (not root or not Debian); tests/test_browser.py and tests/test_docs.py will FAIL (they need it; install chromium, or run as root on Debian)" >&2
fi

# The browser extra's requirements, read from pyproject.toml (one list to maintain).
mapfile -t reqs < <("$PY" - <<'PY'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["browser"]))
PY
)
if "$PY" - "${reqs[@]}" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
from packaging.requirements import Requirement
for r in map(Requirement, sys.argv[1:]):
    try: v = version(r.name)
    except PackageNotFoundError: sys.exit(1)
    if not r.specifier.contains(v, prereleases=True): sys.exit(1)
PY
then
  echo "browser setup: ${reqs[*]} present"
else
  echo "browser setup: pip install ${reqs[*]}"
  "$PY" -m pip install -q --disable-pip-version-check -c constraints.txt "${reqs[@]}"
fi
