//! `VarBuilder`: how model constructors create their parameters.
//!
//! It wraps a `tch::nn::Path` (so parameter names are the dotted checkpoint keys) and adds two things the
//! plain path cannot do:
//! - **shape-only mode**: every parameter is a stride-0 view of one element, so a 7B model can be built to
//!   count its parameters or list its keys without allocating the weights;
//! - **LoRA injection**: a `Linear` built at a path matching the LoRA target patterns gets an adapter.

use std::rc::Rc;

use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::lora::LoraConfig;

struct Ctx {
    shape_only: bool,
    lora: Option<LoraConfig>,
}

/// Creates named parameters in a `VarStore`. Clone freely; sub-paths share the store and the settings.
#[derive(Clone)]
pub struct VarBuilder<'a> {
    path: nn::Path<'a>,
    prefix: Vec<String>,
    ctx: Rc<Ctx>,
}

impl<'a> VarBuilder<'a> {
    /// Parameters with their initial values, in `vs`.
    pub fn new(vs: &'a nn::VarStore) -> Self {
        Self::with_ctx(
            vs,
            Ctx {
                shape_only: false,
                lora: None,
            },
        )
    }

    /// Parameters as one-element stride-0 views: names and shapes are right, nothing is allocated, and the
    /// model must not be run. Used to count parameters of full-size configurations.
    pub fn shape_only(vs: &'a nn::VarStore) -> Self {
        Self::with_ctx(
            vs,
            Ctx {
                shape_only: true,
                lora: None,
            },
        )
    }

    fn with_ctx(vs: &'a nn::VarStore, ctx: Ctx) -> Self {
        VarBuilder {
            path: vs.root(),
            prefix: Vec::new(),
            ctx: Rc::new(ctx),
        }
    }

    /// Every `Linear` created below this builder whose full name the config selects gets a LoRA adapter.
    pub fn with_lora(self, lora: Option<LoraConfig>) -> Self {
        let ctx = Ctx {
            shape_only: self.ctx.shape_only,
            lora,
        };
        VarBuilder {
            path: self.path,
            prefix: self.prefix,
            ctx: Rc::new(ctx),
        }
    }

    /// The builder for a sub-module (`vb.pp("layers").pp(3)`, or `vb.pp("model.layers")`).
    pub fn pp<S: ToString>(&self, name: S) -> Self {
        let name = name.to_string();
        let mut prefix = self.prefix.clone();
        let mut path = self.path.clone();
        for part in name.split('.').filter(|p| !p.is_empty()) {
            prefix.push(part.to_string());
            path = path.sub(part);
        }
        VarBuilder {
            path,
            prefix,
            ctx: self.ctx.clone(),
        }
    }

    /// The dotted checkpoint key of `name` below this builder.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix.join("."))
        }
    }

    /// The dotted name of this module (empty at the root).
    pub fn module_name(&self) -> String {
        self.prefix.join(".")
    }

    pub fn device(&self) -> Device {
        self.path.device()
    }

    pub fn kind(&self) -> Kind {
        self.path.kind()
    }

    pub fn is_shape_only(&self) -> bool {
        self.ctx.shape_only
    }

    pub fn lora(&self) -> Option<&LoraConfig> {
        self.ctx.lora.as_ref()
    }

    /// A trainable parameter.
    pub fn var(&self, name: &str, dims: &[i64], init: Init) -> Result<Tensor> {
        if self.ctx.shape_only {
            // Trainable as a real parameter is, so the trainable rules and counts apply to shape-only models.
            return Ok(self.path.add(name, self.placeholder(dims)?, true));
        }
        Ok(self.path.f_var(name, dims, init)?)
    }

    /// A persistent buffer: saved and loaded with the weights, never trained (SegVol's
    /// `positional_encoding_gaussian_matrix`). Its name must be one of [`BUFFERS`], which is how rules that set
    /// trainability by name keep it frozen (a `VarStore` holds no such mark).
    pub fn buffer(&self, name: &str, value: Tensor) -> Result<Tensor> {
        if !BUFFERS.contains(&name) {
            return Err(crate::ModelError::Config(format!(
                "buffer `{name}` is not listed in m3d_models::builder::BUFFERS"
            )));
        }
        if self.ctx.shape_only {
            let dims = value.size();
            return Ok(self.path.add(name, self.placeholder(&dims)?, false));
        }
        Ok(self.path.add(name, value.to_device(self.device()), false))
    }

    fn placeholder(&self, dims: &[i64]) -> Result<Tensor> {
        // A 0-d element expands to any shape, including the 0-d one of scalar parameters (`logit_scale`).
        let one = Tensor::f_zeros(Vec::<i64>::new().as_slice(), (self.kind(), self.device()))?;
        Ok(one.f_expand(dims, false)?)
    }
}

/// The names (last path component) of the persistent buffers [`VarBuilder::buffer`] creates: state-dict entries
/// that are not parameters in the reference, so never trained, whatever prefix `model.trainable` names.
pub const BUFFERS: [&str; 1] = ["positional_encoding_gaussian_matrix"];

/// Whether the state-dict key `name` is one of the [`BUFFERS`].
pub fn is_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    BUFFERS.contains(&last)
}

/// PyTorch's default initialisation of `nn.Linear`/`nn.Conv*` weights (kaiming uniform with a = sqrt(5),
/// i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))).
pub fn torch_default_init(fan_in: i64) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}
