"""GPU kernel times (torch.profiler, mean of 3 steps) of a training step
through packages of several components, which add into float32 gradients:
LongNet's sum and strided (band + residues) at L = 32768, 16 heads of 128,
bf16, `pkg(q, k, v).backward(g)` on leaves. The packages are
bench/gpu/specs/bench_dilated_sum.json and bench_strided.json with
"backward": true, named train_dilated_sum and train_strided, in $PKGS:

    for n in dilated_sum strided; do
      python3 -c "import json; s = json.load(open('bench/gpu/specs/bench_$n.json')); \
        s.update(name='train_$n', backward=True); json.dump(s, open('/tmp/train_$n.json', 'w'))"
      build/bin/attn-compile /tmp/train_$n.json --target sm_90a -o DIR/train_$n
    done
    PKGS=DIR PYTHONPATH=python python3 bench/multi_component_train_profile.py
"""
import os

import attn
from kernel_times import print_training_step_kernels

B, H, D, L = 1, 16, 128, 32768
for name in ("train_dilated_sum", "train_strided"):
    pkg = attn.load(os.path.join(os.environ["PKGS"], name))
    print_training_step_kernels(pkg, name, B, H, L, D)
