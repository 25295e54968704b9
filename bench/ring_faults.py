"""Failure paths of the NCCL ring on the GPU machine: each must end in a clear
error on every surviving rank, never a hang.

    NCCL_NVLS_ENABLE=0 ATTN_BUILD_DIR=build PYTHONPATH=python \\
        torchrun --nproc_per_node 2 bench/ring_faults.py ring-pkgs MODE

MODE `mismatch`: rank 0 joins with one package, rank 1 with another -> the
start-up identity check names both ranks. MODE `dead`: both join, rank 1 exits
without running -> rank 0's run_rank gives up after its timeout (20 s here)
with an error instead of waiting forever.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import attn  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

pkgs, mode = sys.argv[1], sys.argv[2]
dist.init_process_group("nccl")
rank = dist.get_rank()
torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
names = ["causal_zigzag_16384", "tokenized_zigzag_16384" if mode == "mismatch" else "causal_zigzag_16384"]
ring = attn.load(os.path.join(pkgs, names[rank]))
t0 = time.time()
try:
    ring.join()
    if mode == "dead":
        if rank == 1:
            print("rank 1: exiting without running", flush=True)
            os._exit(0)
        q = torch.randn(1, 16, 8192, 128, device="cuda", dtype=torch.bfloat16)
        ring.run_rank(q, q, q, timeout=20)
    print(f"rank {rank}: FAIL: no error", flush=True)
except attn.AttnError as e:
    print(f"rank {rank}: error after {time.time() - t0:.1f} s: {e}", flush=True)
os._exit(0)
