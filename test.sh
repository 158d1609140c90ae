#!/usr/bin/env bash
# Set up and run esmflash's tests (CPU; GPU tests skip themselves without CUDA).
#   bash test.sh            # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")"
# torch first, pinned: a bare "torch" requirement could pull a multi-GB CUDA build.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# A real browser for the published-site test (Debian's chromium; skipped if it cannot install).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "test.sh: could not install chromium; the browser test will fail" >&2
fi
python3 -m pytest -q "$@"
