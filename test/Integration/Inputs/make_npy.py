# Writes random q, k, v (float32) and lengths (int32) .npy files for attn-run tests.
import sys
import numpy as np

out, b, h, hkv, l, d = sys.argv[1], *map(int, sys.argv[2:])
rng = np.random.default_rng(0)
np.save(f"{out}/q.npy", rng.uniform(-1, 1, (b, h, l, d)).astype(np.float32))
np.save(f"{out}/k.npy", rng.uniform(-1, 1, (b, hkv, l, d)).astype(np.float32))
np.save(f"{out}/v.npy", rng.uniform(-1, 1, (b, hkv, l, d)).astype(np.float32))
np.save(f"{out}/len.npy", np.full((b,), l // 2, dtype=np.int32))
