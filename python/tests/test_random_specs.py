"""Random specs on the CPU target against attn-check's float64 reference,
and random specs compiled for the GPU targets.

Each case draws a pattern tree (full, causal, local, strided, dilated, and
sums, unions and intersections of them two deep, sometimes intersected
with tokenized lengths), the heads (with GQA), the batch, the head
dimension, the CPU tiles and the lengths (Lq = Lk or not) from its own
seed, compiles it with attn-compile and runs attn-check on fresh random
inputs with the outputs poisoned. The draws are fixed by the seeds, so a
failure reproduces with the spec the assertion prints.

The GPU cases (bf16 or f16, head_dim 64 or 128, with tokenized lengths,
key_bias or key_ids, static or dynamic lengths, sm_90a with and without
warp specialisation, and sm_80) must compile and assemble here: ptxas
accepts every kernel, and the PTX multiplies on tensor cores (wgmma on
sm_90a, mma.sync on sm_80). Random trees of the same generator
(random_patterns.py) run on the GPU machine against the float64
reference: gpu_cases.RANDOM_CASES and RANDOM_GRAD_CASES in test_gpu.py and
test_gpu_backward.py."""

import json
import random
import subprocess

import pytest

import attn
from random_patterns import random_pattern
from test_ring import check_ring

CASES = 64


def random_spec(seed):
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4])
    spec = {"name": f"random_{seed}", "heads": heads,
            "kv_heads": rng.choice([h for h in (1, 2, 4) if heads % h == 0]),
            "batch": rng.randint(1, 2), "head_dim": rng.choice([8, 16, 32]),
            "pattern": random_pattern(rng)}
    if rng.random() < 0.3:
        spec["pattern"] = {"intersect": [{"tokenized": {"dedup": False}}, spec["pattern"]]}
    if rng.random() < 0.5:
        spec["target"] = {"arch": "cpu", "q_tile": rng.choice([8, 16, 32, 64]),
                          "kv_tile": rng.choice([8, 16, 32, 64])}
    q_len = rng.randint(1, 300)
    kv_len = q_len if rng.random() < 0.6 else rng.randint(1, 300)
    return spec, q_len, kv_len


def compile_into(tmp_path, spec, shown, flags=()):
    """Compiles `spec` into tmp_path/pkg with attn-compile's `flags`; a
    failure names the case (`shown`) and says what the compiler said."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    built = subprocess.run([attn._tool("attn-compile"), str(path), *flags,
                            "-o", str(tmp_path / "pkg"), "--quiet"], capture_output=True, text=True)
    assert built.returncode == 0, f"{shown}: {built.stderr}"
    return tmp_path / "pkg"


@pytest.mark.parametrize("seed", range(CASES))
def test_random_spec_matches_the_reference(seed, tmp_path):
    spec, q_len, kv_len = random_spec(seed)
    shown = f"spec {json.dumps(spec)}, q_len {q_len}, kv_len {kv_len}"
    compile_into(tmp_path, spec, shown)
    checked = subprocess.run([attn._tool("attn-check"), str(tmp_path / "pkg"), "--seed", str(seed),
                              "--q-len", str(q_len), "--kv-len", str(kv_len)],
                             capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stdout.startswith("PASS"), \
        f"{shown}: {checked.stdout}{checked.stderr}"


GPU_CASES = 16


def random_gpu_spec(seed):
    rng = random.Random(1000 + seed)
    heads = rng.choice([1, 2, 4, 8])
    spec = {"name": f"random_gpu_{seed}", "dtype": rng.choice(["bf16", "f16"]), "heads": heads,
            "kv_heads": rng.choice([h for h in (1, 2, 4, 8) if heads % h == 0]),
            "batch": rng.randint(1, 3), "head_dim": rng.choice([64, 128]),
            "pattern": random_pattern(rng)}
    extra = rng.random()
    if extra < 0.2:
        spec["pattern"] = {"intersect": [{"tokenized": {"dedup": False}}, spec["pattern"]]}
    elif extra < 0.3:
        spec["key_bias"] = True
    elif extra < 0.35:
        spec["key_ids"] = True
    if rng.random() < 0.3:
        spec["seq_len"] = rng.randint(1, 5000)
    target = rng.choice(["sm_90a", "sm_80"])
    flags = ["--warp-specialize=false"] if target == "sm_90a" and rng.random() < 0.3 else []
    return spec, target, flags


@pytest.mark.parametrize("seed", range(GPU_CASES))
def test_random_gpu_spec_assembles_with_tensor_core_instructions(seed, tmp_path):
    spec, target, flags = random_gpu_spec(seed)
    shown = f"spec {json.dumps(spec)}, --target {target} {' '.join(flags)}"
    pkg = compile_into(tmp_path, spec, shown, ["--target", target, *flags])
    assert (pkg / "kernels.cubin").stat().st_size > 0, shown
    ptx = (pkg / "kernels.ptx").read_text()
    assert ("wgmma.mma_async" if target == "sm_90a" else "mma.sync") in ptx, shown


RING_CASES = 20


@pytest.mark.parametrize("seed", range(RING_CASES))
def test_random_ring_spec_matches_one_rank(seed):
    """A random pattern tree over 2, 3 or 4 ranks in a random layout (ranks
    as threads over the in-process transport) against the same pattern on
    one rank, on the same inputs, outputs poisoned: the same output and lse,
    and each rank sends exactly the K and V rows other ranks' queries
    attend. Under the striped layout a pattern whose periods or segments do
    not map onto the ranks is refused, and the refusal must say so and name
    the layouts that take it."""
    rng = random.Random(2000 + seed)
    pattern = random_pattern(rng)
    if rng.random() < 0.2:
        pattern = {"intersect": [{"tokenized": {}}, pattern]}
    ranks, layout = rng.choice([2, 3, 4]), rng.choice(["contiguous", "zigzag", "striped"])
    try:
        check_ring(f"random_ring_{seed}", layout, ranks, seed, pattern=pattern)
    except attn.AttnError as e:
        assert layout == "striped" and "'zigzag' or 'contiguous'" in str(e), \
            f"{json.dumps(pattern)} on {ranks} ranks, layout {layout}: {e}"
