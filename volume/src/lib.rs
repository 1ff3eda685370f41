//! 3-D volume type, the reference preprocessing transforms and the training augmentations.
//!
//! A [`Volume`] is a channel-first `[C, D, H, W]` array stored in C order, the layout MONAI and
//! numpy use, so a volume read from a `.npy` file or written to a shard needs no reordering.
//!
//! [`transforms`] reproduces the preprocessing of the published M3D data (MONAI 1.6.1 on torch
//! CPU, float32) bit for bit where the reference arithmetic is deterministic; [`augment`] holds
//! the training-time augmentations as one fused pass.

pub mod augment;
mod fma;
pub mod transforms;

pub use augment::{
    augment_image, augment_image_into, augment_mask, augment_mask_into, augment_u8_image_into,
    AugmentConfig, AugmentParams,
};
pub use transforms::{
    crop, foreground_bbox, min_max_normalise, permute_spatial, prepare_cap_u8, resize_area,
    resize_nearest, resize_trilinear, scale_intensity_range_percentiles, BBox,
};

/// Errors of volume construction and of the checked (`try_*`) transforms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// The data length does not match the product of the shape.
    #[error("volume of shape {shape:?} needs {expected} values, got {actual}")]
    LengthMismatch {
        shape: [usize; 4],
        expected: usize,
        actual: usize,
    },
    /// The product of the shape does not fit in `usize`.
    #[error("volume shape {shape:?} is too large to address")]
    ShapeOverflow { shape: [usize; 4] },
    /// A resize was asked to produce values from an input with no voxels along some axis.
    #[error("cannot resize a volume of spatial shape {spatial:?} to {size:?}: the input is empty")]
    EmptyInput {
        spatial: [usize; 3],
        size: [usize; 3],
    },
    /// A bounding box does not lie inside the volume or has `start > end`.
    #[error("bounding box {start:?}..{end:?} does not fit a volume of spatial shape {spatial:?}")]
    BadBBox {
        start: [usize; 3],
        end: [usize; 3],
        spatial: [usize; 3],
    },
    /// An axis permutation is not a permutation of `0, 1, 2`.
    #[error("{perm:?} is not a permutation of the spatial axes 0, 1, 2")]
    BadPermutation { perm: [usize; 3] },
}

/// A channel-first 3-D array `[C, D, H, W]` with its values in C order (W varies fastest).
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T> {
    shape: [usize; 4],
    data: Vec<T>,
}

/// Number of elements of `shape`, or `None` on overflow.
pub fn shape_len(shape: [usize; 4]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &s| acc.checked_mul(s))
}

impl<T: Copy> Volume<T> {
    /// Wraps `data` (C order) as a volume of `shape`; the length must match exactly.
    pub fn new(shape: [usize; 4], data: Vec<T>) -> Result<Self, VolumeError> {
        let expected = shape_len(shape).ok_or(VolumeError::ShapeOverflow { shape })?;
        if data.len() != expected {
            return Err(VolumeError::LengthMismatch {
                shape,
                expected,
                actual: data.len(),
            });
        }
        Ok(Self { shape, data })
    }

    /// A volume of `shape` with every voxel set to `value`.
    ///
    /// # Panics
    /// If the element count of `shape` overflows `usize` (the allocation could not exist anyway).
    pub fn filled(shape: [usize; 4], value: T) -> Self {
        let n =
            shape_len(shape).unwrap_or_else(|| panic!("volume shape {shape:?} overflows usize"));
        Self {
            shape,
            data: vec![value; n],
        }
    }

    /// Builds a volume by evaluating `f(c, d, h, w)` for every voxel, in C order.
    pub fn from_fn(shape: [usize; 4], mut f: impl FnMut(usize, usize, usize, usize) -> T) -> Self {
        let n =
            shape_len(shape).unwrap_or_else(|| panic!("volume shape {shape:?} overflows usize"));
        let mut data = Vec::with_capacity(n);
        for c in 0..shape[0] {
            for d in 0..shape[1] {
                for h in 0..shape[2] {
                    for w in 0..shape[3] {
                        data.push(f(c, d, h, w));
                    }
                }
            }
        }
        Self { shape, data }
    }

    /// `[C, D, H, W]`.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// `[D, H, W]`.
    pub fn spatial(&self) -> [usize; 3] {
        [self.shape[1], self.shape[2], self.shape[3]]
    }

    /// `C`.
    pub fn channels(&self) -> usize {
        self.shape[0]
    }

    /// Number of voxels over all channels.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when some dimension is zero.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn data(&self) -> &[T] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<T> {
        self.data
    }

    /// The values of channel `c` (`D * H * W` of them).
    ///
    /// # Panics
    /// If `c >= channels()`.
    pub fn channel(&self, c: usize) -> &[T] {
        let n = self.shape[1] * self.shape[2] * self.shape[3];
        &self.data[c * n..(c + 1) * n]
    }

    /// The voxel at `[c, d, h, w]`, or `None` outside the volume. Convenient in tests and
    /// cold code; hot loops work on [`Volume::data`] directly.
    pub fn get(&self, idx: [usize; 4]) -> Option<T> {
        if idx.iter().zip(self.shape.iter()).any(|(&i, &s)| i >= s) {
            return None;
        }
        let [_, d, h, w] = self.shape;
        self.data
            .get(((idx[0] * d + idx[1]) * h + idx[2]) * w + idx[3])
            .copied()
    }

    /// Applies `f` to every voxel, producing a volume of the same shape.
    pub fn map<U: Copy>(&self, f: impl Fn(T) -> U) -> Volume<U> {
        Volume {
            shape: self.shape,
            data: self.data.iter().map(|&x| f(x)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_length() {
        assert!(Volume::new([1, 2, 3, 4], vec![0u8; 24]).is_ok());
        let err = Volume::new([1, 2, 3, 4], vec![0u8; 23]).unwrap_err();
        assert_eq!(
            err,
            VolumeError::LengthMismatch {
                shape: [1, 2, 3, 4],
                expected: 24,
                actual: 23
            }
        );
        assert!(matches!(
            Volume::new([usize::MAX, 2, 1, 1], Vec::<u8>::new()),
            Err(VolumeError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn accessors_follow_c_order() {
        let v = Volume::from_fn([2, 3, 4, 5], |c, d, h, w| {
            (c * 1000 + d * 100 + h * 10 + w) as u32
        });
        assert_eq!(v.shape(), [2, 3, 4, 5]);
        assert_eq!(v.spatial(), [3, 4, 5]);
        assert_eq!(v.channels(), 2);
        assert_eq!(v.len(), 120);
        assert_eq!(v.data()[1], 1);
        assert_eq!(v.data()[5], 10);
        assert_eq!(v.data()[60], 1000);
        assert_eq!(v.get([1, 2, 3, 4]), Some(1234));
        assert_eq!(v.get([1, 2, 4, 0]), None);
        assert_eq!(v.channel(1)[0], 1000);
        let f = Volume::filled([1, 2, 2, 2], 7i16);
        assert!(f.data().iter().all(|&x| x == 7));
        assert_eq!(v.map(|x| x as f32 * 0.5).get([0, 0, 0, 3]), Some(1.5));
    }
}
