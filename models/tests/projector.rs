//! The LaMed multimodal projectors against an independent torch implementation (F.avg_pool3d +
//! nn.Sequential): outputs, input gradients and parameter gradients, for the published `spp` and the
//! builder's other types.
mod common;

use std::path::Path;

use m3d_models::projector::{
    build_projector, PoolingType, ProjLayerType, ProjectorConfig, ProjectorType,
};
use m3d_models::weights::{load_file_into, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const CASES: &[&str] = &[
    "spp_mlp",
    "spp_linear3",
    "spp_mlp_pool3",
    "spp_seq",
    "linear",
    "mlp2x_gelu",
];

fn run_case(dir: &Path, name: &str) -> f64 {
    let cfg: ProjectorConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let vs = VarStore::new(Device::Cpu);
    let proj = build_projector(&VarBuilder::new(&vs), &cfg).unwrap();
    let report = load_file_into(
        &vs,
        &dir.join(format!("{name}.weights.safetensors")),
        &LoadOptions::default(),
    )
    .unwrap();
    assert!(report.loaded > 0, "{name}: nothing loaded");
    let io = common::read(&dir.join(format!("{name}.io.safetensors")));
    let x = common::get(&io, "x").copy().set_requires_grad(true);
    let y = proj.forward_t(&x, true).unwrap();
    assert_eq!(y.size()[1], cfg.num_output_tokens(), "{name}: token count");
    let d = common::max_abs_diff(&y, common::get(&io, "y"));
    common::assert_close(&format!("{name} output"), &y, common::get(&io, "y"), 1e-5);
    (y * common::get(&io, "r")).sum(Kind::Float).backward();
    common::assert_rel_close(
        &format!("{name} grad.x"),
        &x.grad(),
        common::get(&io, "grad.x"),
        1e-5,
    );
    common::assert_grads(&vs, &io, 1e-5);
    d
}

#[test]
fn projectors_match_torch() {
    let dir = common::run_oracle("lamed_projector_oracle.py", &[]);
    for name in CASES {
        let d = run_case(dir.path(), name);
        println!("{name}: max |out - oracle| = {d:e}");
    }
}

/// The parity test would catch a wrong grid order: pooling an (h, w)-transposed grid changes the output.
#[test]
fn grid_order_matters() {
    let dir = common::run_oracle("lamed_projector_oracle.py", &[]);
    let io = common::read(&dir.path().join("spp_mlp.io.safetensors"));
    let x = common::get(&io, "x");
    // grid 2x4x6: transposing h and w (as a wrong rearrange would) must move the pooled values.
    let swapped = x
        .reshape([2, 2, 4, 6, 24])
        .transpose(2, 3)
        .reshape([2, 48, 24]);
    let cfg: ProjectorConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("spp_mlp.json")).unwrap())
            .unwrap();
    let vs = VarStore::new(Device::Cpu);
    let proj = build_projector(&VarBuilder::new(&vs), &cfg).unwrap();
    let m3d_models::projector::Projector::Spp(spp) = proj else {
        panic!("spp expected")
    };
    let a = spp.pool(x).unwrap();
    let b = spp.pool(&swapped).unwrap();
    assert!(common::max_abs_diff(&a, &b) > 1e-2);
}

#[test]
fn m3d_preset_and_config_parsing() {
    let cfg = ProjectorConfig::m3d(4096);
    assert_eq!(cfg.grid(), [8, 16, 16]);
    assert_eq!(cfg.pooled_grid(), [4, 8, 8]);
    assert_eq!(cfg.num_output_tokens(), 256);
    // A LaMed config.json with the reference's field names; omitted fields take ModelArguments defaults.
    let parsed: ProjectorConfig = serde_json::from_str(
        r#"{"mm_projector_type": "spp", "image_size": [32, 256, 256], "patch_size": [4, 16, 16],
            "mm_hidden_size": 768, "hidden_size": 4096}"#,
    )
    .unwrap();
    assert_eq!(parsed, cfg);
    assert_eq!(parsed.proj_layer_type, ProjLayerType::Mlp);
    assert_eq!(parsed.proj_pooling_type, PoolingType::Spatial);
    assert_eq!(
        "mlp3x_gelu".parse::<ProjectorType>().unwrap(),
        ProjectorType::Mlp { depth: 3 }
    );
    assert!("conv".parse::<ProjectorType>().is_err());

    // Shape-only: the published Llama-2 projector has 768*4096 + 4096 + 4096*4096 + 4096 parameters.
    let vs = VarStore::new(Device::Cpu);
    let _ = build_projector(&VarBuilder::shape_only(&vs), &cfg).unwrap();
    let n: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    assert_eq!(n, 768 * 4096 + 4096 + 4096 * 4096 + 4096);
}

#[test]
fn wrong_input_shape_is_a_typed_error() {
    let cfg = ProjectorConfig::debug(16);
    let vs = VarStore::new(Device::Cpu);
    let proj = build_projector(&VarBuilder::new(&vs), &cfg).unwrap();
    let x = Tensor::zeros([1, 31, 32], (Kind::Float, Device::Cpu));
    match proj.forward(&x) {
        Err(ModelError::Shape { expected, .. }) => assert_eq!(expected, vec![1, 32, 32]),
        other => panic!("expected a shape error, got {other:?}"),
    }
    let bad = ProjectorConfig {
        mm_projector_type: ProjectorType::Identity,
        ..ProjectorConfig::debug(16)
    };
    assert!(matches!(
        build_projector(&VarBuilder::new(&vs), &bad),
        Err(ModelError::Config(_))
    ));
}
