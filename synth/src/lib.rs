//! Synthetic M3D-Data in the published raw layouts.
