//! Readers and writers for the source formats of M3D-Data: `.npy`/`.npz` (including scipy CSR masks), NIfTI,
//! PNG/JPEG slices, and safe resolution of the relative paths dataset files contain.

pub mod error;
pub mod nifti;
pub mod npy;
pub mod npz;
pub mod paths;
pub mod slice;
pub mod sparse;
pub mod tables;

pub use error::FormatError;
