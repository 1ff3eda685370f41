"""Prints {"nifti": shape of a NIfTI, "npy_spatial": the spatial shape of an .npy (a leading channel of 1
dropped)} as JSON, for tests/generate_cli.rs. Usage: nifti_and_npy_shapes.py FILE.nii.gz FILE.npy"""
import json
import sys

import nibabel as nib
import numpy as np

shape = list(np.load(sys.argv[2], mmap_mode="r").shape)
if len(shape) == 4 and shape[0] == 1:
    shape = shape[1:]
print(json.dumps({"nifti": list(nib.load(sys.argv[1]).shape), "npy_spatial": shape}))
