"""Random pattern trees for the random-spec tests: test_random_specs.py
(CPU numerics against attn-check, GPU compilation here) and gpu_cases.py's
RANDOM_CASES and RANDOM_GRAD_CASES (numerics on the GPU machine).

A tree is full, causal, local, strided or dilated, or a sum, union or
intersection of one to three trees, two levels deep. Sizes are drawn
small (a window of a few dozen keys, a stride of a few dozen) or at the
GPU kernels' tile edges (64-key tiles: 64, 65, 128, 130; segments of 256
and 512), so that both the CPU tiles and the GPU tiles meet bands and
groups that they cut at odd places."""


def _size(rng, small, edges):
    """A size up to `small`, or one of `edges`, a third of the time."""
    return rng.choice(edges) if rng.random() < 1 / 3 else rng.randint(1, small)


def random_pattern(rng, depth=0):
    """A random pattern tree drawn from `rng` (random.Random)."""
    kinds = ["full", "causal", "local", "strided", "dilated"]
    if depth < 2:
        kinds += ["sum", "union", "intersect"]
    kind = rng.choice(kinds)
    if kind in ("full", "causal"):
        return {kind: {}}
    if kind == "local":
        local = {"window": _size(rng, 70, [64, 65, 128, 130, 300])}
        if rng.random() < 0.3:
            local["causal"] = False
        return {"local": local}
    if kind == "strided":
        strided = {"stride": _size(rng, 40, [16, 64])}
        if rng.random() < 0.7:
            strided["local"] = _size(rng, 40, [16, 64])
        return {"strided": strided}
    if kind == "dilated":
        rate = rng.choice([1, 2, 3, 4, 8])
        segment = rate * rng.randint(1, 20)
        if rate != 3 and rng.random() < 1 / 3:
            segment = rng.choice([256, 512])
        return {"dilated": {"segment": segment, "rate": rate,
                            "head_offset": rng.random() < 0.5,
                            "causal": rng.random() < 0.6}}
    return {kind: [random_pattern(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
