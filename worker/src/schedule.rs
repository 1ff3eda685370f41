//! Learning-rate schedules, value for value transformers' (`get_cosine_schedule_with_warmup`,
//! `get_constant_schedule_with_warmup`) as the HF Trainer drives them: the factor for optimizer step `s`
//! (0-based: the first step runs at factor 0 when there is warmup, as in HF) multiplies the base lr, and
//! the warmup length is `ceil(total × ratio)` computed in f64 exactly as the Trainer's `get_warmup_steps`
//! does (so `0.07 × 100` gives 8 steps, as in Python).

use std::f64::consts::PI;

/// Warmup steps for `warmup_ratio` of `total` steps: `ceil(total × ratio)` in f64 (transformers'
/// `TrainingArguments.get_warmup_steps` for a ratio below 1).
pub fn warmup_steps(total: u64, warmup_ratio: f64) -> u64 {
    let w = (total as f64 * warmup_ratio).ceil();
    if w.is_finite() && w > 0.0 {
        w as u64
    } else {
        0
    }
}

/// transformers' `_get_cosine_schedule_with_warmup_lr_lambda` with `num_cycles = 0.5`: linear from 0 over
/// `warmup` steps, then half a cosine from 1 to 0 at `total`, clamped at 0 after it.
pub fn cosine_factor(step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let progress =
        (step as i64 - warmup as i64) as f64 / (total as i64 - warmup as i64).max(1) as f64;
    let num_cycles = 0.5f64;
    (0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos())).max(0.0)
}

/// The cosine factor with the warmup derived from a ratio (the Trainer with `warmup_ratio`).
pub fn cosine_with_warmup(step: u64, total: u64, warmup_ratio: f64) -> f64 {
    cosine_factor(step, warmup_steps(total, warmup_ratio), total)
}

/// transformers' `get_constant_schedule_with_warmup` factor.
pub fn constant_factor(step: u64, warmup: u64) -> f64 {
    if step < warmup {
        step as f64 / (warmup as f64).max(1.0)
    } else {
        1.0
    }
}

/// The schedule's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Cosine,
    Constant,
}

/// A learning-rate schedule for a run of `total` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub total: u64,
    pub warmup: u64,
    pub shape: Shape,
}

impl LrSchedule {
    pub fn new(shape: Shape, base_lr: f64, total: u64, warmup_ratio: f64) -> Self {
        LrSchedule {
            base_lr,
            total,
            warmup: warmup_steps(total, warmup_ratio),
            shape,
        }
    }

    /// The schedule of a recipe's `train` section for a run of `total` optimizer steps.
    pub fn from_recipe(train: &m3d_recipes::TrainSection, total: u64) -> Self {
        let shape = match train.schedule {
            m3d_recipes::Schedule::Cosine => Shape::Cosine,
            m3d_recipes::Schedule::Constant => Shape::Constant,
        };
        LrSchedule::new(shape, train.lr, total, train.warmup_ratio)
    }

    /// The learning rate of optimizer step `step` (0-based): `base_lr × factor`, as torch's `LambdaLR`.
    pub fn lr(&self, step: u64) -> f64 {
        let f = match self.shape {
            Shape::Cosine => cosine_factor(step, self.warmup, self.total),
            Shape::Constant => constant_factor(step, self.warmup),
        };
        self.base_lr * f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rounds_like_python() {
        // 0.07 × 100 = 7.000000000000001 in f64: Python's ceil gives 8.
        assert_eq!(warmup_steps(100, 0.07), 8);
        assert_eq!(warmup_steps(100, 0.03), 3);
        assert_eq!(warmup_steps(10, 0.0), 0);
        let s = LrSchedule::new(Shape::Cosine, 2.0, 10, 0.2);
        assert_eq!(s.warmup, 2);
        assert_eq!((s.lr(0), s.lr(1), s.lr(2)), (0.0, 1.0, 2.0));
        assert!(s.lr(10).abs() < 1e-15);
        let c = LrSchedule::new(Shape::Constant, 2.0, 10, 0.2);
        assert_eq!((c.lr(1), c.lr(5)), (1.0, 2.0));
    }
}
