#!/usr/bin/env bash
# CPU target vs the double-precision reference at L = 4096 (B=1, H=4, D=64,
# f32), one run each on fresh random inputs; also checks the numerics.
# Usage: bash bench/cpu_l4096.sh > bench/cpu_l4096.md
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
echo "CPU target, B=1 H=4 D=64 L=4096 f32, one thread, $(nproc) cores: $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs)."
echo
echo "| pattern | package (s) | reference (s) | out rel. error |"
echo "| --- | --- | --- | --- |"
run() {
  local name=$1 pattern=$2
  echo "{\"name\": \"$name\", \"heads\": 4, \"head_dim\": 64, \"seq_len\": 4096, \"pattern\": $pattern}" > "$tmp/$name.json"
  build/bin/attn-compile "$tmp/$name.json" -o "$tmp/$name" --quiet
  out=$(build/bin/attn-check "$tmp/$name" --time)
  err=$(echo "$out" | grep -oE "out_err=[^ ]+" | cut -d= -f2)
  pk=$(echo "$out" | grep -oE "package [0-9.]+" | cut -d' ' -f2)
  rf=$(echo "$out" | grep -oE "reference [0-9.]+" | cut -d' ' -f2)
  echo "| $name \`$pattern\` | $pk | $rf | $err |"
}
run causal '{"causal": {}}'
run local '{"local": {"window": 256}}'
run strided '{"strided": {"stride": 64}}'
run dilated '{"sum": [{"dilated": {"segment": 256, "rate": 1, "head_offset": true, "causal": true}}, {"dilated": {"segment": 1024, "rate": 4, "head_offset": true, "causal": true}}, {"dilated": {"segment": 4096, "rate": 16, "head_offset": true, "causal": true}}]}'
rm -rf "$tmp"
