//! Weight I/O against files PyTorch, safetensors and transformers wrote themselves: one safetensors file,
//! shards with an index, `torch.save` `.bin`; strict-load reports; key maps; and our own files loaded back by
//! transformers' `from_pretrained`.
mod common;

use std::collections::HashMap;
use std::path::Path;

use m3d_models::weights::{self, KeyMap, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

fn sorted(mut v: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_same(a: &[(String, Tensor)], b: &[(String, Tensor)]) {
    let ka: Vec<&String> = a.iter().map(|x| &x.0).collect();
    let kb: Vec<&String> = b.iter().map(|x| &x.0).collect();
    assert_eq!(ka, kb);
    for ((k, x), (_, y)) in a.iter().zip(b) {
        assert_eq!(x.kind(), y.kind(), "{k}");
        assert!(x.equal(y), "{k} differs");
    }
}

/// A VarStore whose variables have the given names and shapes (filled with a sentinel value).
fn store_like(specs: &[(String, Vec<i64>)]) -> VarStore {
    let vs = VarStore::new(Device::Cpu);
    let vb = VarBuilder::new(&vs);
    for (name, dims) in specs {
        let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
        let b = if module.is_empty() {
            vb.clone()
        } else {
            vb.pp(module)
        };
        let _ = b.var(leaf, dims, Init::Const(-7.0)).unwrap();
    }
    vs
}

#[test]
fn safetensors_sharded_and_bin_agree() {
    let dir = common::run_oracle("weights_oracle.py", &[]);
    let d = dir.path();
    let single = sorted(weights::read_tensors(&d.join("single")).unwrap());
    let sharded = sorted(weights::read_tensors(&d.join("sharded")).unwrap());
    let via_index =
        sorted(weights::read_tensors(&d.join("sharded/model.safetensors.index.json")).unwrap());
    let bin = sorted(weights::read_tensors(&d.join("bin")).unwrap());
    let keys: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("keys.json")).unwrap()).unwrap();
    let expected: Vec<String> = serde_json::from_value(keys["keys"].clone()).unwrap();
    let got: Vec<String> = single.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(got, expected);
    assert_same(&single, &sharded);
    assert_same(&single, &via_index);
    assert_same(&single, &bin);
    assert!(
        std::fs::read_dir(d.join("sharded")).unwrap().count() > 3,
        "fixture is really sharded"
    );
}

#[test]
fn dtypes_survive_both_formats() {
    let dir = common::run_oracle("weights_oracle.py", &[]);
    let st = sorted(weights::read_tensors(&dir.path().join("mixed.safetensors")).unwrap());
    let bin = sorted(weights::read_tensors(&dir.path().join("mixed.bin")).unwrap());
    assert_same(&st, &bin);
    let kinds: HashMap<&str, Kind> = st.iter().map(|(k, t)| (k.as_str(), t.kind())).collect();
    assert_eq!(kinds["bf16"], Kind::BFloat16);
    assert_eq!(kinds["f16"], Kind::Half);
    assert_eq!(kinds["i64"], Kind::Int64);
    assert_eq!(kinds["nested.name.weight"], Kind::Float);
}

#[test]
fn strict_load_lists_every_disagreement_and_loads_nothing() {
    let dir = common::run_oracle("weights_oracle.py", &[]);
    let ckpt = dir.path().join("single");
    let tensors = sorted(weights::read_tensors(&ckpt).unwrap());
    let mut specs: Vec<(String, Vec<i64>)> =
        tensors.iter().map(|(k, t)| (k.clone(), t.size())).collect();
    specs.retain(|(k, _)| k != "model.norm.weight");
    specs.push(("model.extra.weight".into(), vec![3]));
    for (k, dims) in specs.iter_mut() {
        if k == "lm_head.weight" {
            dims[0] += 1;
        }
    }
    let vs = store_like(&specs);
    let err = weights::load_file_into(&vs, &ckpt, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(&ckpt.display().to_string()) && msg.contains("parameters match"),
        "{msg}"
    );
    assert!(
        msg.contains("missing from the checkpoint (1)") && msg.contains("model.extra.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("unexpected in the checkpoint (1)") && msg.contains("model.norm.weight"),
        "{msg}"
    );
    assert!(
        msg.contains("lm_head.weight: model [65, 16], checkpoint [64, 16]"),
        "{msg}"
    );
    // Nothing copied: every variable still holds the sentinel.
    for (k, t) in vs.variables() {
        assert_eq!(
            t.max().double_value(&[]),
            -7.0,
            "{k} was written by a failed strict load"
        );
    }
    // Lenient: the same report, and everything that matches is loaded.
    let report = weights::load_file_into(&vs, &ckpt, &LoadOptions::lenient()).unwrap();
    assert_eq!(report.missing, vec!["model.extra.weight"]);
    assert_eq!(report.unexpected, vec!["model.norm.weight"]);
    assert_eq!(report.mismatched.len(), 1);
    let vars = vs.variables();
    let src: HashMap<String, Tensor> = tensors.into_iter().collect();
    assert!(vars["model.embed_tokens.weight"].equal(&src["model.embed_tokens.weight"]));
}

#[test]
fn key_map_selects_a_submodel() {
    let dir = common::run_oracle("weights_oracle.py", &[]);
    let ckpt = dir.path().join("sharded");
    let tensors = sorted(weights::read_tensors(&ckpt).unwrap());
    let specs: Vec<(String, Vec<i64>)> = tensors
        .iter()
        .filter_map(|(k, t)| Some((k.strip_prefix("model.")?.to_string(), t.size())))
        .collect();
    let vs = store_like(&specs);
    // Without the map the names do not line up at all.
    assert!(matches!(
        weights::load_into(
            &vs,
            tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.shallow_clone()))
                .collect(),
            &LoadOptions::default()
        ),
        Err(ModelError::StateDict(_))
    ));
    let opts = LoadOptions::default().with_key_map(KeyMap::select_prefix("model."));
    let report = weights::load_file_into(&vs, &ckpt, &opts).unwrap();
    assert!(report.is_clean());
    assert_eq!(report.loaded, specs.len());
    let vars = vs.variables();
    let src: HashMap<String, Tensor> = tensors.into_iter().collect();
    assert!(vars["layers.1.mlp.up_proj.weight"].equal(&src["model.layers.1.mlp.up_proj.weight"]));
    // add_prefix is the inverse direction.
    assert_eq!(
        KeyMap::add_prefix("model.vision_tower.vision_tower.")
            .apply("blocks.0.norm1.weight")
            .as_deref(),
        Some("model.vision_tower.vision_tower.blocks.0.norm1.weight")
    );
    assert_eq!(
        KeyMap::select_prefix("vision_encoder.").apply("language_encoder.x"),
        None
    );
}

fn check_with_transformers(ours: &Path, reference: &Path) {
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(reference.join(f), ours.join(f)).unwrap();
    }
    let out = m3d_testkit::run_python(
        &common::oracle_dir().join("weights_oracle.py"),
        &[
            "-",
            "check",
            ours.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    );
    assert_eq!(out.trim(), "ok");
}

#[test]
fn our_files_load_in_transformers() {
    let dir = common::run_oracle("weights_oracle.py", &[]);
    let reference = dir.path().join("single");
    let tensors = sorted(weights::read_tensors(&reference).unwrap());

    let sharded = dir.path().join("ours-sharded");
    weights::save_sharded(&sharded, &tensors, 6 * 1024).unwrap();
    let n_files = std::fs::read_dir(&sharded).unwrap().count();
    assert!(n_files > 3, "expected several shards, got {n_files} files");
    assert_same(&tensors, &sorted(weights::read_tensors(&sharded).unwrap()));
    check_with_transformers(&sharded, &reference);

    let single = dir.path().join("ours-single");
    weights::save_sharded(&single, &tensors, usize::MAX).unwrap();
    assert!(single.join("model.safetensors").is_file());
    assert!(!single.join("model.safetensors.index.json").exists());
    check_with_transformers(&single, &reference);
    // No temporary files left behind.
    for entry in std::fs::read_dir(&sharded).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.contains(".tmp-"), "leftover {name}");
    }
}

#[test]
fn broken_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = vec![(
        "a.weight".to_string(),
        Tensor::ones([64, 64], (Kind::Float, Device::Cpu)),
    )];
    let good = d.join("good.safetensors");
    weights::save_safetensors(&good, &t).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = d.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let e = weights::read_tensors(&truncated).unwrap_err().to_string();
    assert!(e.contains("truncated.safetensors"), "{e}");

    let bogus = d.join("bogus.bin");
    std::fs::write(&bogus, b"not a zip archive").unwrap();
    let e = weights::read_tensors(&bogus).unwrap_err().to_string();
    assert!(e.contains("bogus.bin"), "{e}");

    let e = weights::read_tensors(&d.join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("absent.safetensors"), "{e}");

    let index = d.join("model.safetensors.index.json");
    std::fs::write(&index, r#"{"metadata":{},"weight_map":{"a.weight":"good.safetensors","b.weight":"good.safetensors"}}"#).unwrap();
    let e = weights::read_tensors(&index).unwrap_err().to_string();
    assert!(e.contains("b.weight") && e.contains("missing"), "{e}");

    std::fs::write(
        &index,
        r#"{"weight_map":{"a.weight":"../good.safetensors"}}"#,
    )
    .unwrap();
    let e = weights::read_tensors(&index).unwrap_err().to_string();
    assert!(e.contains("plain file name"), "{e}");

    std::fs::write(d.join("x.onnx"), b"not ours").unwrap();
    let e = weights::read_tensors(&d.join("x.onnx"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown weight format"), "{e}");
    // A path that does not exist is named as missing, not as a format.
    let e = weights::read_tensors(&d.join("never-written/final"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no such file or folder"), "{e}");
    let e = weights::save_safetensors(
        &d.join("dup.safetensors"),
        &[t[0].clone_pair(), t[0].clone_pair()],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("given twice"), "{e}");
}

trait ClonePair {
    fn clone_pair(&self) -> (String, Tensor);
}
impl ClonePair for (String, Tensor) {
    fn clone_pair(&self) -> (String, Tensor) {
        (self.0.clone(), self.1.shallow_clone())
    }
}

/// Host copies written as header + shared buffers: the concatenation is a safetensors file that the
/// `safetensors` package loads with the same values and dtypes, and that we read back bit for bit; a key
/// given twice is refused.
#[test]
fn staged_parts_form_a_safetensors_file() {
    let dir = common::run_oracle("weights_oracle.py", &[]);
    let mut tensors = sorted(weights::read_tensors(&dir.path().join("mixed.safetensors")).unwrap());
    // Enough tensors that staging runs on several threads; an odd-sized one checks the header padding.
    for i in 0..9 {
        tensors.push((
            format!("extra.{i}"),
            Tensor::randn([i + 1, 3], (Kind::Float, Device::Cpu)),
        ));
    }
    tensors.push(("odd".into(), Tensor::ones([3], (Kind::Int8, Device::Cpu))));
    let host = weights::to_host_tensors(&tensors).unwrap();
    let parts = weights::safetensors_parts(&host).unwrap();
    assert_eq!(parts.len(), tensors.len() + 1);
    let bytes: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    let back = weights::read_safetensors_bytes(&bytes, Path::new("parts")).unwrap();
    let want = sorted(tensors.iter().map(|p| p.clone_pair()).collect());
    assert_same(&want, &sorted(back));
    let file = dir.path().join("parts.safetensors");
    std::fs::write(&file, &bytes).unwrap();
    // Streamed from the file: every byte observed in order, one entry read into an offered tensor.
    let offered = Tensor::zeros([1, 3], (Kind::Float, Device::Cpu));
    let mut seen = Vec::new();
    let streamed = weights::read_safetensors_from(
        &mut std::fs::File::open(&file).unwrap(),
        bytes.len() as u64,
        &file,
        &mut |b| seen.extend_from_slice(b),
        &mut |n| (n == "extra.0").then(|| offered.shallow_clone()),
    )
    .unwrap();
    assert!(seen == bytes, "observed bytes are the file");
    assert_same(
        &sorted(tensors.iter().map(|p| p.clone_pair()).collect()),
        &sorted(streamed),
    );
    assert!(offered.equal(&tensors.iter().find(|p| p.0 == "extra.0").unwrap().1));
    let cut = weights::read_safetensors_from(
        &mut &bytes[..bytes.len() - 1],
        bytes.len() as u64 - 1,
        &file,
        &mut |_| {},
        &mut |_| None,
    )
    .unwrap_err()
    .to_string();
    assert!(cut.contains("parts.safetensors"), "{cut}");
    let script = dir.path().join("read_parts.py");
    std::fs::write(
        &script,
        r#"
import json, sys
from safetensors import safe_open
with safe_open(sys.argv[1], "pt") as f:
    meta = f.metadata()
    print(json.dumps({"meta": meta, "sums": {k: float(f.get_tensor(k).double().sum()) for k in f.keys()},
                      "dtypes": {k: str(f.get_tensor(k).dtype) for k in f.keys()}}))
"#,
    )
    .unwrap();
    let out = m3d_testkit::run_python(&script, &[file.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["meta"]["format"], "pt");
    for (k, t) in &tensors {
        let want = t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
        let got = v["sums"][k].as_f64().unwrap_or(f64::NAN);
        assert!(
            (want - got).abs() <= 1e-9 * want.abs().max(1.0),
            "{k}: {want} vs {got}"
        );
    }
    assert_eq!(v["dtypes"]["bf16"], "torch.bfloat16");
    let twice =
        weights::to_host_tensors(&[tensors[0].clone_pair(), tensors[0].clone_pair()]).unwrap();
    let e = weights::safetensors_parts(&twice).unwrap_err().to_string();
    assert!(e.contains("given twice"), "{e}");
}
