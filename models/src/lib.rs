//! The M3D models in libtorch (through `tch`): M3D-CLIP (3-D ViT + BERT) and M3D-LaMed (ViT + projector +
//! Llama/Phi-3 + SegVol-style mask decoder), with LoRA.
//!
//! Every model follows one shape: an HF-shaped `Config` that deserialises the published `config.json`, a
//! constructor from a [`VarBuilder`] path, and `forward`. Parameter names are the published checkpoints' keys,
//! so weights load by name through [`weights`]; nothing is renamed in model code.
//!
//! **Invariant: this crate knows nothing about shards, recipes or the cluster**; it maps tensors to tensors.

pub mod builder;
pub mod error;
pub mod flops;
pub mod generate;
pub mod layers;
pub mod lora;
pub mod weights;

pub mod bert;
pub mod clip;
pub mod lamed;
pub mod llama;
pub mod llm;
pub mod phi3;
pub mod precision;
pub mod presets;
pub mod projector;
pub mod segvol;
pub mod tokenizer;
pub mod vit3d;

pub use builder::VarBuilder;
pub use error::{ModelError, Result};
