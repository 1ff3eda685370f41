//! Readers and writers for the source formats of M3D-Data: `.npy`/`.npz` (including scipy CSR masks), NIfTI,
//! PNG/JPEG slices, and safe resolution of the relative paths dataset files contain.

pub mod error;
pub mod npy;

pub use error::FormatError;
