#!/usr/bin/env bash
# The project's test command: every unit, property and integration test.
# Integration tests start the real `pairdb` binary on 127.0.0.1 with free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --locked "$@"
