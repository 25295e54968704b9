"""GPU kernels of a step under torch.profiler, shared by bench/gqa_profile.py,
bench/sparse_train_profile.py, bench/tokenized_ab.py and
bench/strided_short.py; CUDA-event timing (bench/gpu_long.py and the
backward A/B scripts) and their rows written to $OUT."""
import json
import os
import statistics

import torch
from torch.profiler import profile, ProfilerActivity


def profiled(step, warm, reps):
    """Runs step() `warm` times, then `reps` times under torch.profiler
    (CUDA activity); returns the profiler."""
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    return p


def event_ms(fn, calls):
    """Median ms of `calls` calls of fn(), each between two CUDA events."""
    times = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def about_ms(fn, budget_ms=1000, most=40):
    """Median ms of fn() over about `budget_ms` of calls (3 to `most`),
    counted from one timed call."""
    return event_ms(fn, max(3, min(most, int(budget_ms / max(event_ms(fn, 1), 1e-3)))))


def checked_backward_ms(call, grads, first, where, compare=True):
    """The backward A/B scripts' step: runs call() once, keeps a copy of
    the gradients `grads` it wrote as `first` if there is none yet, else
    (with `compare`) asserts they equal `first` bit for bit (`where` names
    the run in the message), then times call() (about_ms). Returns
    (first, ms)."""
    call()
    torch.cuda.synchronize()
    if first is None:
        first = tuple(x.clone() for x in grads)
    elif compare:
        for a, b, what in zip(grads, first, ("dq", "dk", "dv")):
            assert torch.equal(a, b), f"{where}: {what} differs"
    return first, about_ms(call)


def write_rows(name, rows):
    """rows as $OUT/<name>.json (/tmp without OUT) with the device and torch
    version, which it also prints before the caller's table."""
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"{name}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows}, f, indent=1)
    print(f"\ndevice: {torch.cuda.get_device_name()}, torch {torch.__version__}")


def print_kernel_times(step, title, warm=2, reps=3, top=8):
    """Profiles `reps` calls of step() after `warm` and prints the `top`
    kernels by GPU time per call (µs, launches per call, name) and the sum
    over every kernel."""
    p = profiled(step, warm, reps)
    print(f"== {title}")
    rows = []
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append((t / reps, e.count // reps, e.key[:90]))
    rows.sort(reverse=True)
    for t, count, name in rows[:top]:
        print(f"{t:9.1f} us  x{count:<3} {name}")
    print(f"all {sum(r[0] for r in rows):.1f} us", flush=True)


def print_training_step_kernels(pkg, title, B, H, L, D, top=16):
    """The kernels of one autograd training step through `pkg` on fresh bf16
    leaves [B, H, L, D] (print_kernel_times: 2 warm steps, 3 profiled)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)

    def step():
        for x in (q, k, v):
            x.grad = None
        pkg(q, k, v).backward(g)

    print_kernel_times(step, title, warm=2, reps=3, top=top)
