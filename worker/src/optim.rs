//! AdamW with decoupled weight decay, step for step `torch.optim.AdamW` (its single-tensor path, which torch
//! takes on the CPU): the same operations in the same order, with the scalars (bias corrections, step size)
//! computed in f64 as Python does, so f32 results agree to the last bit or nearly.
//!
//! Per parameter:
//! ```text
//! step += 1
//! p      *= 1 - lr · weight_decay                      (decoupled decay, group's weight_decay)
//! m       = lerp(m, g, 1 - β1)
//! v       = β2 · v + (1 - β2) · g²
//! p      -= lr / (1 - β1^step) · m / (sqrt(v) / sqrt(1 - β2^step) + eps)     (eps outside the sqrt)
//! ```
//!
//! **Precision**: parameters that are not f32 (bf16) get an f32 *master* copy; the update runs on the master
//! and the parameter receives its rounded value (DeepSpeed's bf16 mode). Moments are always f32. Gradients of
//! such parameters are accumulated in f32 buffers ([`AdamW::accumulate_grads`], to call after each backward
//! of an accumulation), so k micro-batches do not add up in bf16.
//!
//! **Gradients**: a parameter is updated when it has a gradient (libtorch's `grad` is defined) or an f32
//! buffer. `tch` cannot reset a gradient to "none", so [`AdamW::zero_grad`] zeroes it: from its second step
//! on, a parameter that once had a gradient is updated every step, as torch does with
//! `zero_grad(set_to_none=False)`.
//!
//! **State** is a list of named tensors ([`AdamW::state_dict`]), keys `<param>.step`, `<param>.exp_avg`,
//! `<param>.exp_avg_sq` and, for non-f32 parameters, `<param>.master`; [`AdamW::load_state_dict`] checks
//! every key and shape.

use std::collections::{BTreeMap, HashSet};

use regex::Regex;
use tch::{Kind, Tensor};

/// Optimizer errors, naming the parameter or state key.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    #[error("parameter `{0}` is given twice")]
    Duplicate(String),
    #[error("optimizer state has key `{0}`, which belongs to no parameter")]
    UnknownKey(String),
    #[error("optimizer state lacks `{0}`")]
    MissingKey(String),
    #[error("optimizer state `{key}` has shape {got:?}, the parameter needs {expected:?}")]
    Shape {
        key: String,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("parameter `{name}`: {message}")]
    Param { name: String, message: String },
    #[error("no-decay pattern `{pattern}`: {source}")]
    Pattern {
        pattern: String,
        source: regex::Error,
    },
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, OptimError>;

/// Hyper-parameters shared by all groups.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
}

impl Default for AdamWConfig {
    /// torch's defaults: betas (0.9, 0.999), eps 1e-8.
    fn default() -> Self {
        AdamWConfig {
            betas: (0.9, 0.999),
            eps: 1e-8,
        }
    }
}

/// A parameter group: its own weight decay (torch's `param_groups[i]["weight_decay"]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamGroup {
    pub name: String,
    pub weight_decay: f64,
}

#[derive(Debug)]
struct ParamState {
    name: String,
    group: usize,
    /// The model's parameter (shares storage with the VarStore variable).
    param: Tensor,
    /// f32 copy of a non-f32 parameter; the update runs here.
    master: Option<Tensor>,
    /// f32 gradient accumulated from a non-f32 parameter's gradients.
    grad_acc: Option<Tensor>,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Option<Tensor>,
    step: i64,
}

impl ParamState {
    fn is_f32(&self) -> bool {
        self.master.is_none()
    }
}

/// `torch.optim.AdamW` over named libtorch parameters.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    groups: Vec<ParamGroup>,
    params: Vec<ParamState>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            groups: Vec::new(),
            params: Vec::new(),
        }
    }

    /// Adds a group of named parameters with its weight decay. Parameters are updated in the order given.
    pub fn add_group(
        &mut self,
        name: &str,
        weight_decay: f64,
        params: Vec<(String, Tensor)>,
    ) -> Result<()> {
        let mut seen: HashSet<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        for (n, _) in &params {
            if !seen.insert(n) {
                return Err(OptimError::Duplicate(n.clone()));
            }
        }
        let group = self.groups.len();
        self.groups.push(ParamGroup {
            name: name.to_string(),
            weight_decay,
        });
        for (name, param) in params {
            if !param.is_floating_point() {
                return Err(OptimError::Param {
                    name,
                    message: format!("kind {:?} is not floating point", param.kind()),
                });
            }
            let master = if param.kind() == Kind::Float {
                None
            } else {
                Some(param.detach().to_kind(Kind::Float))
            };
            self.params.push(ParamState {
                name,
                group,
                param,
                master,
                grad_acc: None,
                exp_avg: None,
                exp_avg_sq: None,
                step: 0,
            });
        }
        Ok(())
    }

    /// The usual two groups from named parameters (sorted by name): `decay` with `weight_decay`, and
    /// `no_decay` (weight decay 0) for the names matching any of `no_decay` (regexes searched in the
    /// lower-cased name; the recipe's `train.no_decay`, transformers' rule by default).
    pub fn with_no_decay(
        cfg: AdamWConfig,
        weight_decay: f64,
        no_decay: &[String],
        mut params: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let patterns = no_decay
            .iter()
            .map(|p| {
                Regex::new(p).map_err(|source| OptimError::Pattern {
                    pattern: p.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let (skip, decay): (Vec<_>, Vec<_>) = params.into_iter().partition(|(n, _)| {
            let lower = n.to_lowercase();
            patterns.iter().any(|p| p.is_match(&lower))
        });
        let mut opt = AdamW::new(cfg);
        opt.add_group("decay", weight_decay, decay)?;
        opt.add_group("no_decay", 0.0, skip)?;
        Ok(opt)
    }

    /// The optimizer a recipe's `train` section describes over `params`: betas, eps, `weight_decay` with
    /// the `no_decay` patterns.
    pub fn from_recipe(
        train: &m3d_recipes::TrainSection,
        params: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let cfg = AdamWConfig {
            betas: (train.betas[0], train.betas[1]),
            eps: train.eps,
        };
        Self::with_no_decay(cfg, train.weight_decay, &train.no_decay, params)
    }

    /// The trainable variables of a VarStore, by name.
    pub fn trainable(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Names of the parameters of group `group`, in update order.
    pub fn group_params(&self, group: usize) -> Vec<&str> {
        self.params
            .iter()
            .filter(|p| p.group == group)
            .map(|p| p.name.as_str())
            .collect()
    }

    /// Moves the gradients of non-f32 parameters into their f32 buffers (and zeroes them), so that the
    /// micro-batches of an accumulation add up in f32. A no-op for f32 parameters, whose gradients libtorch
    /// already accumulates in f32. Call after each backward (the step calls it too).
    pub fn accumulate_grads(&mut self) {
        tch::no_grad(|| {
            for p in self.params.iter_mut().filter(|p| !p.is_f32()) {
                let mut g = p.param.grad();
                if !g.defined() {
                    continue;
                }
                let gf = g.to_kind(Kind::Float);
                match &mut p.grad_acc {
                    Some(acc) => {
                        let _ = acc.f_add_(&gf);
                    }
                    None => p.grad_acc = Some(gf),
                }
                let _ = g.zero_();
            }
        });
    }

    /// The f32 gradients the next step will use, one per parameter that has one (same order as the
    /// parameters): the parameters' own gradients for f32 ones, the f32 buffers for the others. They share
    /// storage with what the step reads, so clipping or all-reducing them in place acts on the step.
    pub fn grads(&mut self) -> Vec<(String, Tensor)> {
        self.accumulate_grads();
        self.params
            .iter()
            .filter_map(|p| grad_of(p).map(|g| (p.name.clone(), g)))
            .collect()
    }

    /// Gives every trainable parameter without a gradient a zero one, as DeepSpeed does before its all-reduce
    /// (the reference trains through DeepSpeed ZeRO-0): a parameter a rank's batch did not reach (the
    /// segmentation module, for a batch without masks) must still take part in the all-reduce of every rank,
    /// or the ranks' buckets differ.
    pub fn fill_missing_grads(&mut self) -> Result<()> {
        let missing: Vec<usize> = (0..self.params.len())
            .filter(|&i| grad_of(&self.params[i]).is_none())
            .collect();
        self.backward_zero_through(&missing)?;
        self.accumulate_grads();
        Ok(())
    }

    /// Back-propagates zero through the parameters at `indices` (positions in [`AdamW::params`]), which gives
    /// each a gradient (zero, or its gradient plus zero) and runs its gradient hooks, without touching the f32
    /// buffers.
    pub fn backward_zero_through(&self, indices: &[usize]) -> Result<()> {
        if indices.is_empty() {
            return Ok(());
        }
        // libtorch has no gradient setter in tch: back-propagate zero through each parameter instead.
        let sums = indices
            .iter()
            .filter_map(|&i| self.params.get(i))
            .map(|p| p.param.f_sum(Kind::Float))
            .collect::<std::result::Result<Vec<Tensor>, _>>()?;
        let zero = Tensor::f_stack(&sums, 0)?.f_sum(Kind::Float)? * 0.0;
        zero.f_backward()?;
        Ok(())
    }

    /// The parameters, in update order (the order of [`AdamW::grads`] once every one has a gradient).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.param.shallow_clone()))
            .collect()
    }

    /// One [`ReadyGrad`] per parameter (same order as [`AdamW::params`]), for taking each gradient on another
    /// thread as soon as the last backward pass of a step has finished it. Give the taken gradients back with
    /// [`AdamW::set_grads`].
    pub fn ready_grads(&self) -> Vec<ReadyGrad> {
        self.params
            .iter()
            .map(|p| ReadyGrad {
                name: p.name.clone(),
                param: p.param.shallow_clone(),
                acc: p.grad_acc.as_ref().map(Tensor::shallow_clone),
                f32: p.is_f32(),
            })
            .collect()
    }

    /// Makes `grads` (one per parameter, from [`ReadyGrad::take`], possibly reduced since) the gradients the
    /// next step uses.
    pub fn set_grads(&mut self, grads: Vec<Tensor>) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(OptimError::Param {
                name: format!("{} gradients", grads.len()),
                message: format!("given for {} parameters", self.params.len()),
            });
        }
        for (p, g) in self.params.iter_mut().zip(grads) {
            if p.is_f32() {
                // Taken from the parameter itself: reduced in place already, unless it was replaced.
                if g.data_ptr() != p.param.grad().data_ptr() {
                    tch::no_grad(|| p.param.grad().f_copy_(&g))?;
                }
            } else {
                p.grad_acc = Some(g);
            }
        }
        Ok(())
    }

    /// Zeroes the gradients (and the f32 buffers).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.param.zero_grad();
            p.grad_acc = None;
        }
    }

    /// One AdamW step at learning rate `lr` (the scheduled value: base lr × schedule factor).
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.accumulate_grads();
        let (beta1, beta2) = self.cfg.betas;
        let eps = self.cfg.eps;
        tch::no_grad(|| -> Result<()> {
            for p in &mut self.params {
                let Some(grad) = grad_of(p) else { continue };
                let wd = self.groups[p.group].weight_decay;
                let mut target = p.master.as_ref().unwrap_or(&p.param).shallow_clone();
                p.step += 1;
                if wd != 0.0 {
                    let _ = target.f_mul_scalar_(1.0 - lr * wd)?;
                }
                let exp_avg = p
                    .exp_avg
                    .get_or_insert_with(|| target.zeros_like())
                    .shallow_clone();
                let exp_avg_sq = p
                    .exp_avg_sq
                    .get_or_insert_with(|| target.zeros_like())
                    .shallow_clone();
                let (mut exp_avg, mut exp_avg_sq) = (exp_avg, exp_avg_sq);
                let _ = exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
                // addcmul_(g, g, value=c) computes v + (c·g)·g; (g·c)·g is the same product.
                let _ = exp_avg_sq.f_mul_scalar_(beta2)?;
                let _ = exp_avg_sq.f_addcmul_(&grad.f_mul_scalar(1.0 - beta2)?, &grad)?;
                let step = p.step as f64;
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = lr / bias_correction1;
                let bias_correction2_sqrt = bias_correction2.powf(0.5);
                let mut denom = exp_avg_sq.f_sqrt()?.f_div_scalar(bias_correction2_sqrt)?;
                let _ = denom.f_add_scalar_(eps)?;
                // addcdiv_(m, d, value=-s) computes p + (-s·m) / d.
                let _ = target.f_addcdiv_(&exp_avg.f_mul_scalar(-step_size)?, &denom)?;
                if let Some(master) = &p.master {
                    p.param.f_copy_(&master.to_kind(p.param.kind()))?;
                }
            }
            Ok(())
        })
    }

    /// The optimizer state as named tensors (copies, on the parameters' device).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        self.state_view()
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect()
    }

    /// [`AdamW::state_dict`] without the copies: handles to the live state, which the next step changes in
    /// place. For a caller that copies them at once (staging a checkpoint): copying 1.6 GB of moments first
    /// doubled the time training waits.
    pub fn state_view(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for p in &self.params {
            if p.step > 0 {
                out.push((format!("{}.step", p.name), Tensor::from(p.step)));
            }
            if let Some(m) = &p.exp_avg {
                out.push((format!("{}.exp_avg", p.name), m.shallow_clone()));
            }
            if let Some(v) = &p.exp_avg_sq {
                out.push((format!("{}.exp_avg_sq", p.name), v.shallow_clone()));
            }
            if let Some(master) = &p.master {
                out.push((format!("{}.master", p.name), master.shallow_clone()));
            }
        }
        out
    }

    /// Restores [`AdamW::state_dict`]'s tensors. Every key must belong to a parameter with the right shape;
    /// a parameter with a step needs both moments; a non-f32 parameter needs its master (the parameter is
    /// set from it). Nothing changes on error.
    pub fn load_state_dict(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let by_name: BTreeMap<&str, usize> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut staged: Vec<[Option<Tensor>; 4]> =
            self.params.iter().map(|_| Default::default()).collect();
        for (key, t) in tensors {
            let (param, field) = key
                .rsplit_once('.')
                .ok_or_else(|| OptimError::UnknownKey(key.clone()))?;
            let &i = by_name
                .get(param)
                .ok_or_else(|| OptimError::UnknownKey(key.clone()))?;
            let slot = match field {
                "step" => 0,
                "exp_avg" => 1,
                "exp_avg_sq" => 2,
                "master" if !self.params[i].is_f32() => 3,
                _ => return Err(OptimError::UnknownKey(key.clone())),
            };
            let expected = if slot == 0 {
                vec![]
            } else {
                self.params[i].param.size()
            };
            if t.size() != expected {
                return Err(OptimError::Shape {
                    key: key.clone(),
                    expected,
                    got: t.size(),
                });
            }
            staged[i][slot] = Some(t.shallow_clone());
        }
        for (p, s) in self.params.iter().zip(&staged) {
            let has_step = s[0].is_some();
            for (slot, field) in [(1, "exp_avg"), (2, "exp_avg_sq")] {
                if has_step != s[slot].is_some() {
                    let missing = if has_step { field } else { "step" };
                    return Err(OptimError::MissingKey(format!("{}.{missing}", p.name)));
                }
            }
            if !p.is_f32() && s[3].is_none() {
                return Err(OptimError::MissingKey(format!("{}.master", p.name)));
            }
        }
        let device_of = |p: &ParamState| p.param.device();
        tch::no_grad(|| -> Result<()> {
            for (p, s) in self.params.iter_mut().zip(staged) {
                let [step, m, v, master] = s;
                let dev = device_of(p);
                p.step = step.map(|t| t.int64_value(&[])).unwrap_or(0);
                p.exp_avg = m.map(|t| t.to_kind(Kind::Float).to_device(dev));
                p.exp_avg_sq = v.map(|t| t.to_kind(Kind::Float).to_device(dev));
                if let Some(master) = master {
                    let master = master.to_kind(Kind::Float).to_device(dev);
                    p.param.f_copy_(&master.to_kind(p.param.kind()))?;
                    p.master = Some(master);
                }
                p.grad_acc = None;
            }
            Ok(())
        })
    }
}

/// The f32 gradient a step uses for `p`, if it has one.
/// One parameter's gradient as [`AdamW::grads`] will give it, taken as soon as its last backward pass finished it
/// ([`AdamW::ready_grads`]).
pub struct ReadyGrad {
    name: String,
    param: Tensor,
    /// The f32 buffer of the earlier micro-batches (non-f32 parameters).
    acc: Option<Tensor>,
    f32: bool,
}

impl ReadyGrad {
    /// The parameter's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The gradient: an f32 parameter's own (the same storage), or for another dtype the f32 sum of the
    /// earlier micro-batches and this gradient (whose bf16 copy is zeroed, as [`AdamW::accumulate_grads`] does).
    pub fn take(&self) -> Result<Tensor> {
        tch::no_grad(|| {
            let mut g = self.param.grad();
            if !g.defined() {
                return Err(OptimError::Param {
                    name: self.name.clone(),
                    message: "has no gradient".into(),
                });
            }
            if self.f32 {
                return Ok(g);
            }
            let gf = g.f_to_kind(Kind::Float)?;
            let out = match &self.acc {
                Some(acc) => acc.f_add(&gf)?,
                None => gf,
            };
            let _ = g.f_zero_()?;
            Ok(out)
        })
    }
}

fn grad_of(p: &ParamState) -> Option<Tensor> {
    if p.is_f32() {
        let g = p.param.grad();
        g.defined().then_some(g)
    } else {
        p.grad_acc.as_ref().map(Tensor::shallow_clone)
    }
}
