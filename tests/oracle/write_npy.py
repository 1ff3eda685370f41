"""Writes a float32 .npy of the given comma-separated shape (values 0..n), for tests. Usage: write_npy.py FILE SHAPE"""
import sys

import numpy as np

shape = [int(d) for d in sys.argv[2].split(",")]
np.save(sys.argv[1], np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape))
