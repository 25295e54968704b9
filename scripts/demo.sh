#!/usr/bin/env bash
# The main job on a machine without a GPU: compile an example spec for the CPU
# target, run it on random inputs through the runtime and check the result
# against the double-precision reference.
set -euo pipefail
cd "$(dirname "$0")/.."
spec=${1:-examples/longnet_dilated.json}
pkg=build/packages/$(basename "$spec" .json)
build/bin/attn-compile "$spec" -o "$pkg" --target cpu
build/bin/attn-check "$pkg" --q-len 1024 --time
