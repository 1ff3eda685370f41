//! SegVol (M3D-LaMed's promptable 3-D mask decoder) against an independent torch implementation with
//! MONAI's ViT as image encoder: logits, low-resolution masks, IoU head, Dice and BCE losses, and the
//! gradients of Dice + BCE w.r.t. every parameter and the text prompt.
mod common;

use m3d_models::precision::Precision;
use m3d_models::segvol::{self, SegVol, SegVolConfig};
use m3d_models::weights::{load_file_into, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

#[test]
fn segvol_matches_torch() {
    let dir = common::run_oracle("seg_oracle.py", &[]);
    let cfg: SegVolConfig =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    let vs = VarStore::new(Device::Cpu);
    let model = SegVol::new(&VarBuilder::new(&vs), &cfg).unwrap();
    load_file_into(
        &vs,
        &dir.path().join("weights.safetensors"),
        &LoadOptions::default(),
    )
    .unwrap();
    let io = common::read(&dir.path().join("io.safetensors"));

    let pe = model.prompt_encoder.pe_layer.forward(cfg.grid());
    common::assert_close("dense pe", &pe, common::get(&io, "pe"), 1e-5);

    let text = common::get(&io, "text").copy().set_requires_grad(true);
    let out = model
        .forward_t(common::get(&io, "image"), Some(&text), true)
        .unwrap();
    let d_logits = common::max_abs_diff(&out.logits, common::get(&io, "logits"));
    common::assert_close("logits", &out.logits, common::get(&io, "logits"), 1e-4);
    common::assert_close(
        "low-res logits",
        &out.low_res_logits,
        common::get(&io, "low"),
        1e-4,
    );
    common::assert_close(
        "iou",
        &out.iou_pred,
        &common::get(&io, "iou").narrow(1, 0, 1),
        1e-4,
    );

    let target = common::get(&io, "target");
    let (dice, bce) = segvol::seg_losses(&out.logits, target).unwrap();
    common::assert_rel_close("dice", &dice, common::get(&io, "dice"), 1e-5);
    common::assert_rel_close("bce", &bce, common::get(&io, "bce"), 1e-5);
    (dice + bce).backward();
    common::assert_rel_close(
        "grad.text",
        &text.grad(),
        common::get(&io, "grad.text"),
        1e-4,
    );
    let worst = common::assert_grads_same_support(&vs, &io, 1e-4, 1);
    println!("segvol: max |logits - oracle| = {d_logits:e}, worst grad rel diff = {worst:e}");
}

#[test]
fn m3d_preset_shapes_and_parameter_count() {
    let cfg = SegVolConfig::m3d();
    assert_eq!(cfg.grid(), [8, 16, 16]);
    assert_eq!(cfg.low_res_size(), [32, 64, 64]);
    let vs = VarStore::new(Device::Cpu);
    let _ = SegVol::new(&VarBuilder::shape_only(&vs), &cfg).unwrap();
    let vars = vs.variables();
    let shape = |k: &str| vars.get(k).unwrap_or_else(|| panic!("no `{k}`")).size();
    assert_eq!(
        shape("mask_decoder.output_upscaling.0.weight"),
        [768, 192, 2, 2, 2]
    );
    assert_eq!(
        shape("mask_decoder.output_upscaling.1.weight"),
        [192, 16, 32, 32]
    );
    assert_eq!(
        shape("mask_decoder.output_upscaling.3.weight"),
        [192, 96, 2, 2, 2]
    );
    assert_eq!(
        shape("mask_decoder.txt_align_upscaled_embedding.weight"),
        [96, 768]
    );
    assert_eq!(
        shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"),
        [384, 768]
    );
    assert_eq!(
        shape("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
        [3, 384]
    );
    assert_eq!(
        shape("prompt_encoder.mask_downscaling.6.weight"),
        [768, 16, 1, 1]
    );
    assert_eq!(
        shape("image_encoder.patch_embedding.position_embeddings"),
        [1, 2048, 768]
    );
    assert!(!vars.contains_key("image_encoder.cls_token"));
}

#[test]
fn loss_ignores_minus_one_and_checks_shapes() {
    let logits = Tensor::from_slice(&[2.0f32, -1.0, 0.5, 3.0]).reshape([1, 1, 1, 2, 2]);
    let t = Tensor::from_slice(&[1.0f32, -1.0, 0.0, 1.0]).reshape([1, 1, 1, 2, 2]);
    let t0 = Tensor::from_slice(&[1.0f32, 0.0, 0.0, 1.0]).reshape([1, 1, 1, 2, 2]);
    let a = segvol::dice_loss(&logits, &t).unwrap();
    let b = segvol::dice_loss(&logits, &t0).unwrap();
    assert_eq!(a.double_value(&[]), b.double_value(&[]));
    // Hand computation: p = sigmoid(logits), 1 - 2 (p0 + p3) / (sum p + 2 + 1).
    let p: Vec<f64> = [2.0f64, -1.0, 0.5, 3.0]
        .iter()
        .map(|x| 1.0 / (1.0 + (-x).exp()))
        .collect();
    let want = 1.0 - 2.0 * (p[0] + p[3]) / (p.iter().sum::<f64>() + 3.0);
    assert!((a.double_value(&[]) - want).abs() < 1e-6);
    let bad = Tensor::zeros([1, 1, 1, 2, 3], (Kind::Float, Device::Cpu));
    assert!(matches!(
        segvol::bce_loss(&logits, &bad),
        Err(ModelError::Shape { .. })
    ));
}

#[test]
fn wrong_text_width_is_a_typed_error() {
    let cfg = SegVolConfig::debug();
    let vs = VarStore::new(Device::Cpu);
    let model = SegVol::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let image = Tensor::zeros([1, 1, 8, 32, 32], (Kind::Float, Device::Cpu));
    let text = Tensor::zeros([1, 31], (Kind::Float, Device::Cpu));
    assert!(matches!(
        model.forward(&image, Some(&text)),
        Err(ModelError::Shape { .. })
    ));
    let image = Tensor::zeros([1, 1, 8, 32, 16], (Kind::Float, Device::Cpu));
    assert!(matches!(
        model.forward(&image, None),
        Err(ModelError::Shape { .. })
    ));
    // Precomputed features on another grid than the decoder's (before, a libtorch panic in the upscaling
    // LayerNorm).
    let features = Tensor::zeros([1, 32, 2, 4, 2], (Kind::Float, Device::Cpu));
    let err = model
        .forward_decoder(&features, [8, 32, 16], None)
        .unwrap_err();
    assert!(matches!(err, ModelError::Shape { .. }), "{err}");
    let features = Tensor::zeros([1, 32, 2, 4, 4], (Kind::Float, Device::Cpu));
    let out = model.forward_decoder(&features, [8, 32, 32], None).unwrap();
    assert_eq!(out.logits.size(), [1, 1, 8, 32, 32]);
}

#[test]
fn runs_in_bf16() {
    let cfg = SegVolConfig::debug();
    let mut vs = VarStore::new(Device::Cpu);
    let model = SegVol::new(&VarBuilder::new(&vs), &cfg).unwrap();
    Precision::Bf16.apply(&mut vs).unwrap();
    let opts = (Kind::BFloat16, Device::Cpu);
    let image = Tensor::randn([2, 1, 8, 32, 32], opts);
    let text = Tensor::randn([2, 32], opts);
    let out = model.forward_t(&image, Some(&text), true).unwrap();
    assert_eq!(out.logits.kind(), Kind::BFloat16);
    assert_eq!(out.logits.size(), [2, 1, 8, 32, 32]);
    let target = Tensor::rand([2, 1, 8, 32, 32], opts).gt(0.5);
    let (dice, bce) = segvol::seg_losses(&out.logits, &target).unwrap();
    assert_eq!(dice.kind(), Kind::Float);
    let loss = dice + bce;
    assert!(loss.double_value(&[]).is_finite());
    loss.backward();
    let g = vs.variables()["mask_decoder.txt_align_upscaled_embedding.weight"].grad();
    assert_eq!(g.kind(), Kind::BFloat16);
}
