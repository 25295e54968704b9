# Prints the shape of an .npy file and whether all its values are finite.
import sys
import numpy as np

a = np.load(sys.argv[1])
print("shape", a.shape, "finite", bool(np.isfinite(a).all()))
