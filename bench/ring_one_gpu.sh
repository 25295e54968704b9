#!/usr/bin/env bash
# attn-run on one GPU with GPU ring packages: every rank as a thread on GPU 0
# (--gpus 1, the in-process transport's device copies) for cross attention
# (causal, q_len 2048 against kv_len 8192, zigzag over 4 ranks), and the
# forked NCCL path with one rank; each against the single-GPU package on the
# same inputs and against the float64 reference. Packages built here by
#   attn-compile scratch/h1/run/<name>.json --target sm_90a -o scratch/h1/run/<name>
# (the JSON specs this script writes first, when missing).
# Usage: bash bench/ring_one_gpu.sh PKG_DIR   (run from the repository root)
set -euo pipefail
dir=$1
root=$PWD
export LD_LIBRARY_PATH=$root/build/lib NCCL_NVLS_ENABLE=0
run=$root/build/bin/attn-run
cd "$dir"
python3 - <<'PY'
import numpy as np
rng = np.random.default_rng(7)
def bf16(x):  # round to bf16 so that every path sees the same inputs
    b = x.astype(np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).view(np.float32)
for tag, lq, lk in (("", 2048, 8192), ("1", 4096, 4096)):
    np.save(f"q{tag}.npy", bf16(rng.standard_normal((1, 8, lq, 128))))
    np.save(f"k{tag}.npy", bf16(rng.standard_normal((1, 4, lk, 128))))
    np.save(f"v{tag}.npy", bf16(rng.standard_normal((1, 4, lk, 128))))
PY
echo "== single-GPU package, q_len 2048, kv_len 8192, causal"
$run single --q q.npy --k k.npy --v v.npy -o one.npy --lse one_lse.npy --repeat 5
echo "== ring, 4 ranks (zigzag) as threads on GPU 0"
$run ring4 --nranks 4 --gpus 1 --q q.npy --k k.npy --v v.npy -o four.npy --lse four_lse.npy
echo "== ring, 1 rank, forked process over NCCL"
$run ring1 --nranks 1 --q q1.npy --k k1.npy --v v1.npy -o r1.npy --repeat 3
$run s1 --q q1.npy --k k1.npy --v v1.npy -o s1.npy
echo "== ring, 4 ranks without --gpus 1 on a machine with fewer GPUs (must fail clearly)"
$run ring4 --nranks 4 --q q.npy --k k.npy --v v.npy -o x.npy 2>&1 | tail -2 || true
python3 - <<'PY'
import numpy as np, torch
from attn import reference
def check(name, got, want):
    print(f"{name}: max |diff| {np.abs(got - want).max():.3e}")
q, k, v = (torch.from_numpy(np.load(f"{n}.npy")).cuda() for n in "qkv")
ref, ref_lse = reference.attention(q, k, v, {"causal": {}})
ref, ref_lse = ref.cpu().numpy(), ref_lse.cpu().numpy()
one, four = np.load("one.npy"), np.load("four.npy")
rel = lambda a: np.linalg.norm(a - ref) / np.linalg.norm(ref)
print(f"relative error vs float64: single {rel(one):.3e}, ring of 4 on one GPU {rel(four):.3e}")
check("ring of 4 vs single (out)", four, one)
check("ring of 4 vs single (lse)", np.load("four_lse.npy"), np.load("one_lse.npy"))
check("ring of 1 over NCCL vs single", np.load("r1.npy"), np.load("s1.npy"))
assert rel(four) < 1.5e-2 and not np.isnan(four).any()
PY
