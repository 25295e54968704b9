"""Where the host's time goes in a call from Python: what one eager call of
a GPU package, and of an attn.sparse layer, costs on the CPU, and which
steps of the call path take it.

Where a call's CPU time exceeds its kernels' GPU time, calls queued back
to back run at the CPU's pace: the GPU waits for the host. That happens
for short sequences (attn.sparse's strided layer at L = 8192 takes 64 µs
of GPU time), so the CPU side of a call is worth keeping small.

    ATTN_GPU_PACKAGES=gpu-pkgs ATTN_BUILD_DIR=build \\
        PYTHONPATH=python:python/tests:bench python3 bench/host_overhead.py

Prints three tables (results in bench/host_overhead_h100.md):
1. For each call: the CPU µs it takes to issue on an idle GPU, the µs per
   call queued back to back (the larger of its CPU and GPU times), and the
   span of its kernels on the GPU (torch.profiler), for: a package called on [B, H,
   L, D] tensors with `out` given; the same through the C API alone
   (ctypes, arguments built once: the runtime's and the driver's share);
   attn.sparse layers on [B, L, E] slices of a fused projection.
2. The cost of each step the call path takes (torch and ctypes calls
   timed alone, µs each).
3. cProfile's top functions over many layer calls (cProfile slows every
   Python call down; read it for shares, not for absolute times).
"""
import cProfile
import ctypes
import io
import os
import pstats
import statistics
import sys
import time
import warnings

import torch

import attn
import gpu_patterns

warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
PKGS = os.environ.get("ATTN_GPU_PACKAGES", "gpu-pkgs")
dev = torch.device("cuda")


def call_costs(call, calls=400):
    """(CPU µs to issue one call on an idle GPU, µs per call queued back to
    back, µs from the call's first kernel's start to its last one's end),
    medians. Back to back, a call takes the larger of its CPU and GPU
    times: once the launch queue is full the CPU waits for the GPU, and
    the GPU waits for the CPU where that is the slower."""
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    issue = []
    for _ in range(200):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        issue.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    queued = gpu_patterns.us_per_call(call, calls)
    _, span = gpu_patterns.kernel_durations(call)
    return statistics.median(issue), queued, span


def step_us(fn, n=20000):
    """µs per call of fn, timed alone (median of 3 runs of n calls)."""
    for _ in range(100):
        fn()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


rows = []

# 1a. A package on [B, H, L, D] tensors, out given (the bench packages).
for name, L in (("bench_causal", 256), ("bench_strided", 1024), ("bench_strided", 8192)):
    pkg = attn.load(os.path.join(PKGS, name))
    q, k, v = (torch.randn(1, 16, L, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    rows.append((f"{name} pkg(q, k, v, out=out)", L, *call_costs(lambda: pkg(q, k, v, out=out))))

    # 1b. The C API alone: arguments built once, then only the ctypes call.
    t = pkg._torch_args(q, k, v, None, False, out)
    lib = attn._runtime()
    handle = pkg._handle_on(q.device.index)
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    p = t["ptrs"]

    def c_api():
        if lib.attn_package_run_keys(handle, *p[:4], None, None, *p[4:], stream) != 0:
            raise attn.AttnError(lib.attn_last_error().decode())
    rows.append((f"{name} C API alone", L, *call_costs(c_api)))

# 1c. attn.sparse layers on fused-projection slices.
for L, case, layer, q, k, v in gpu_patterns.sparse_layers([1024, 8192], PKGS):
    with torch.no_grad():
        rows.append((f"attn.sparse {case[3]}{case[4] or ''} layer(q, k, v)", L,
                     *call_costs(lambda: layer(q, k, v), calls=200)))

print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
      f"Python {sys.version.split()[0]}")
print("\n| call | L | CPU µs to issue one call | µs per call, back to back | kernels' span µs |")
print("|---|---|---|---|---|")
for what, L, issue, queued, span in rows:
    print(f"| {what} | {L} | {issue:.1f} | {queued:.1f} | {span:.1f} |")

# 2. The steps of the call path, each alone.
x = torch.randn(1, 1024, 3 * 2048, device=dev, dtype=torch.bfloat16)
q = x[..., :2048]
qh = q.reshape(1, 1024, 16, 128).transpose(1, 2)
o = torch.empty(1, 1024, 2048, device=dev, dtype=torch.bfloat16)
lib = attn._runtime()


def with_device():
    with torch.cuda.device(q.device):
        pass


steps = [
    ("with torch.cuda.device(t.device): pass", lambda: with_device()),
    ("torch.cuda.current_stream(t.device).cuda_stream",
     lambda: torch.cuda.current_stream(q.device).cuda_stream),
    ("torch._C._cuda_getCurrentRawStream(index)",
     lambda: torch._C._cuda_getCurrentRawStream(q.device.index)),
    ("torch.cuda.current_device()", lambda: torch.cuda.current_device()),
    ("torch.cuda.get_device_capability(t.device)",
     lambda: torch.cuda.get_device_capability(q.device)),
    ("torch.compiler.is_compiling()", lambda: torch.compiler.is_compiling()),
    ("torch.is_grad_enabled()", lambda: torch.is_grad_enabled()),
    ("t.device (attribute)", lambda: q.device),
    ("t.device != u.device", lambda: q.device != x.device),
    ("t.is_cuda", lambda: q.is_cuda),
    ("t.dtype != torch.bfloat16", lambda: q.dtype != torch.bfloat16),
    ("t.is_contiguous()", lambda: qh.is_contiguous()),
    ("t.stride()", lambda: qh.stride()),
    ("t.data_ptr()", lambda: qh.data_ptr()),
    ("t.shape (attribute)", lambda: qh.shape),
    ("(c_int64 * 4)(*t.shape)", lambda: (ctypes.c_int64 * 4)(*qh.shape)),
    ("x.reshape(B, L, H, D).transpose(1, 2)", lambda: q.reshape(1, 1024, 16, 128).transpose(1, 2)),
    ("torch.empty(B, L, E)", lambda: torch.empty(1, 1024, 2048, device=dev, dtype=torch.bfloat16)),
    ("torch.empty_like(q [B, H, L, D])", lambda: torch.empty_like(qh)),
    ("out.view(B, L, H, D).transpose(1, 2)",
     lambda: o.view(1, 1024, 16, 128).transpose(1, 2)),
    ("attn_last_error (a no-op ctypes call)", lambda: lib.attn_last_error()),
]

print("\n| step | µs |")
print("|---|---|")
for what, fn in steps:
    print(f"| {what} | {step_us(fn):.2f} |")

# 3. cProfile over layer calls (strided at L = 1024: short kernels).
for L, case, layer, q, k, v in gpu_patterns.sparse_layers([1024], PKGS):
    if case[3] != "strided":
        continue
    with torch.no_grad():
        for _ in range(50):
            layer(q, k, v)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3000):
            layer(q, k, v)
        prof.disable()
        torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    print("\ncProfile, 3000 calls of the strided layer at L = 1024, by own time:")
    print("\n".join(s.getvalue().splitlines()[:45]))
