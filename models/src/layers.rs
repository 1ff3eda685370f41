//! The building blocks every model shares, with PyTorch's parameter names (`weight`, `bias`) and numerics:
//! `nn.Linear` (with LoRA and the autocast compute kind), `nn.LayerNorm`, HF's RMSNorm, `nn.Embedding`,
//! the activations HF configs name and dropout; plus the token-id check and the attention-mask fill value
//! the encoders and decoders use alike.

use tch::nn::Init;
use tch::{Device, Kind, Tensor};

use crate::builder::{torch_default_init, VarBuilder};
use crate::error::{ModelError, Result};
use crate::lora::LoraAdapter;

/// `nn.Linear`, optionally with a LoRA adapter (added when the builder's LoRA config selects this module).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(vb: &VarBuilder, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = vb.var("weight", &[out_dim, in_dim], torch_default_init(in_dim))?;
        let bias = if bias {
            Some(vb.var("bias", &[out_dim], torch_default_init(in_dim))?)
        } else {
            None
        };
        let lora = match vb.lora() {
            Some(cfg) if cfg.targets(&vb.module_name()) => {
                Some(LoraAdapter::new(vb, cfg, in_dim, out_dim)?)
            }
            _ => None,
        };
        Ok(Linear { weight, bias, lora })
    }

    /// `train` switches the LoRA dropout on; the base layer has none. Inside
    /// [`autocast`](crate::precision::autocast) the product runs in the autocast kind (weights cast on the
    /// fly, gradients flowing back to them in their own kind).
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        // Every operand goes to the autocast kind, also when the weight already has it and the input does
        // not (bf16 parameters fed an f32 activation), as torch's autocast does. `to_kind` to the same
        // kind is free.
        let kind = crate::precision::autocast_kind().filter(|_| xs.is_floating_point());
        let cast = |t: &Tensor| match kind {
            Some(k) => t.to_kind(k),
            None => t.shallow_clone(),
        };
        let xs = cast(xs);
        let bias = self.bias.as_ref().map(cast);
        let ys = xs.linear(&cast(&self.weight), bias.as_ref());
        match &self.lora {
            Some(lora) => ys + lora.forward_t(&xs, train),
            None => ys,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_t(xs, false)
    }
}

/// `nn.LayerNorm` over the last dimension.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &VarBuilder, dim: i64, eps: f64) -> Result<Self> {
        let weight = vb.var("weight", &[dim], Init::Const(1.0))?;
        let bias = vb.var("bias", &[dim], Init::Const(0.0))?;
        Ok(LayerNorm {
            weight,
            bias,
            dim,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// RMSNorm as Llama and Phi-3 compute it: in f32, then back to the input dtype before the weight.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(vb: &VarBuilder, dim: i64, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: vb.var("weight", &[dim], Init::Const(1.0))?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let x = xs.to_kind(Kind::Float);
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let x = x * (var + self.eps).rsqrt();
        &self.weight * x.to_kind(kind)
    }
}

/// `nn.Embedding`.
#[derive(Debug)]
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(vb: &VarBuilder, num: i64, dim: i64) -> Result<Self> {
        Ok(Embedding {
            weight: vb.var(
                "weight",
                &[num, dim],
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
        })
    }

    pub fn forward(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.weight, ids, -1, false, false)
    }
}

/// The activation functions HF configs name (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact (erf) GELU, `nn.GELU()`.
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
    Relu,
    #[serde(alias = "swish")]
    Silu,
}

impl Activation {
    pub fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => xs.gelu("none"),
            Activation::GeluTanh => xs.gelu("tanh"),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
        }
    }
}

/// Dropout that is the identity outside training and for p = 0.
pub fn dropout(xs: Tensor, p: f64, train: bool) -> Tensor {
    if train && p > 0.0 {
        xs.dropout(p, true)
    } else {
        xs
    }
}

/// `torch.finfo(kind).min`: what HF fills masked attention scores with (a fully masked row then becomes
/// uniform instead of NaN, as it would with -inf).
pub(crate) fn dtype_min(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.389_531_389_251_535_5e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// Checks (B, T) token ids, B and T >= 1, against a vocabulary of `n`: an id outside it would otherwise be
/// a libtorch panic on the CPU and an unrecoverable device-side assert on CUDA. The range is read back in one
/// copy (on a GPU, one host sync); a caller that checked the ids on the host passes a [`CheckedIds`] instead.
pub(crate) fn check_token_ids(name: &str, ids: &Tensor, n: i64) -> Result<()> {
    check_ids_shape(name, ids)?;
    let range = Tensor::stack(&[ids.min(), ids.max()], 0)
        .to_kind(Kind::Int64)
        .to_device(Device::Cpu);
    let range = Vec::<i64>::try_from(&range)?;
    let (lo, hi) = (range[0], range[1]);
    if lo < 0 || hi >= n {
        return Err(ModelError::Input(format!(
            "{name} out of range [0, {n}): min {lo}, max {hi}"
        )));
    }
    Ok(())
}

fn check_ids_shape(name: &str, ids: &Tensor) -> Result<()> {
    let s = ids.size();
    if s.len() != 2 || s[0] < 1 || s[1] < 1 || !matches!(ids.kind(), Kind::Int64 | Kind::Int) {
        return Err(ModelError::Input(format!(
            "{name} must be (batch, seq) integers with batch, seq >= 1, got {s:?} {:?}",
            ids.kind()
        )));
    }
    Ok(())
}

/// Proof that a batch's (B, T) token ids were checked on the host, against a vocabulary, before they were
/// moved to the device: a forward pass given one skips its own range check, which on a GPU is a device→host
/// read (a host sync in the middle of the step). Made only by [`CheckedIds::check`]; a forward pass still
/// compares the shape and the vocabulary with the tensor it is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedIds {
    shape: [i64; 2],
    vocab: i64,
}

impl CheckedIds {
    /// Checks `ids` (B, T), on the CPU, against a vocabulary of `vocab`, with the errors of the device check.
    pub fn check(name: &str, ids: &Tensor, vocab: i64) -> Result<CheckedIds> {
        if ids.device() != Device::Cpu {
            return Err(ModelError::Input(format!(
                "{name}: host checks take the ids on the CPU, got {:?}",
                ids.device()
            )));
        }
        check_token_ids(name, ids, vocab)?;
        let s = ids.size();
        Ok(CheckedIds {
            shape: [s[0], s[1]],
            vocab,
        })
    }

    /// (B, T) of the checked ids.
    pub fn shape(&self) -> [i64; 2] {
        self.shape
    }

    /// Ok when these are the checks of `ids` for a vocabulary of `n`: the same shape, checked against no
    /// larger a vocabulary.
    pub(crate) fn covers(&self, name: &str, ids: &Tensor, n: i64) -> Result<()> {
        check_ids_shape(name, ids)?;
        if ids.size() != self.shape || self.vocab > n {
            return Err(ModelError::Input(format!(
                "{name}: the host checks were made for {:?} ids and a vocabulary of {}, given {:?} ids and {n}",
                self.shape,
                self.vocab,
                ids.size()
            )));
        }
        Ok(())
    }
}

/// `t` on `device` without waiting: a non-blocking copy (from pageable host memory CUDA stages the data
/// before returning, so `t` may be dropped at once; no stream synchronisation, unlike a blocking copy).
/// `t` itself when it is already there.
pub(crate) fn to_device_async(t: &Tensor, device: Device) -> Tensor {
    if t.device() == device {
        t.shallow_clone()
    } else {
        t.to_device_(device, t.kind(), true, false)
    }
}

/// Runs `block` on `x` as an activation checkpoint (`m3d_grad_hooks::checkpoint`): only `x` is kept for the
/// backward pass, which runs `block` again. The recomputation runs under the autocast kind of this forward (a
/// thread-local setting the engine's thread would not have), so it computes what the forward did.
pub fn checkpointed<F>(x: &Tensor, block: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + 'static,
{
    let kind = crate::precision::autocast_kind();
    let body = move |ins: &[Tensor]| {
        crate::precision::autocast(kind, || block(&ins[0]).map(|y| vec![y]))
            .map_err(|e| e.to_string())
    };
    // SAFETY: the blocks m3d checkpoints capture `Arc`s of their layers and tensors of the forward pass they
    // belong to. While the backward pass runs the block on the engine's thread, the thread that called backward
    // waits in it, and the layers' weights are only read (optimizer steps come after backward returns).
    #[allow(unsafe_code)]
    let outs = unsafe { m3d_grad_hooks::checkpoint(&[x], body) }?;
    outs.into_iter()
        .next()
        .ok_or_else(|| ModelError::Input("a checkpointed block returned nothing".into()))
}
