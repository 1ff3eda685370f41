//! `m3d plan` on the shipped full-size recipes: each plans at its reference world size (8 GPUs of 80 GB)
//! and fits; its parameters per part, total and trainable, equal the reference model's as the oracle
//! (transformers / MONAI / peft on the meta device, the reference's freezing rules) counts them; a recipe
//! that does not fit is refused with the numbers.
mod common;

use std::collections::BTreeMap;

use common::{m3d, m3d_ok, oracle};
use serde_json::Value;

const RECIPES: [&str; 7] = [
    "clip",
    "lamed-llama2-7b-stage1",
    "lamed-llama2-7b-stage2",
    "lamed-llama3-8b-stage1",
    "lamed-llama3-8b-stage2",
    "lamed-phi3-mini-stage1",
    "lamed-phi3-mini-stage2",
];

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn shipped_recipes_plan_at_their_reference_size_with_the_reference_parameters() {
    let dir = tempfile::tempdir().unwrap();
    oracle("plan_parts.py", &[dir.path().to_str().unwrap()]);
    let want: BTreeMap<String, BTreeMap<String, [i64; 2]>> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("parts.json")).unwrap())
            .unwrap();
    for name in RECIPES {
        let recipe = root().join(format!("recipes/{name}.yaml"));
        // M3D-Cap has 120,092 training pairs; the epoch's size only scales the time.
        let out = m3d_ok(&[
            "plan",
            recipe.to_str().unwrap(),
            "--workers",
            "8",
            "--gpu",
            "h100-80gb",
            "--samples",
            "120092",
            "--json",
        ]);
        let plan: Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{name}: {e}\n{out}"));
        assert_eq!(plan["fits"], Value::Bool(true), "{name}: {out}");
        let got: BTreeMap<String, [i64; 2]> = plan["parts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_string(),
                    [
                        p["params"].as_i64().unwrap(),
                        p["trainable"].as_i64().unwrap(),
                    ],
                )
            })
            .collect();
        assert_eq!(got, want[name], "{name}: parts (params, trainable)");
        let steps = 120092 / plan["global_batch"].as_u64().unwrap();
        assert_eq!(plan["steps_per_epoch"].as_u64(), Some(steps), "{name}");
        let flops = plan["flops_per_sample"].as_f64().unwrap();
        assert!(flops > 1e12, "{name}: {flops} FLOPs per sample");
        assert!(plan["estimated_seconds"].as_f64().unwrap() > 0.0, "{name}");
    }
}

#[test]
fn a_recipe_that_does_not_fit_is_refused_with_the_numbers() {
    let plan_on = |recipe: &str, gpu: &str| {
        let recipe = root().join(format!("recipes/{recipe}.yaml"));
        let out = m3d(&[
            "plan",
            recipe.to_str().unwrap(),
            "--gpu",
            gpu,
            "--samples",
            "1000",
        ]);
        assert!(!out.status.success(), "{recipe:?} fits {gpu}?");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Phi-3 stage 2 fits a 40 GB GPU with a smaller micro-batch (4: it divides the 8 samples per worker).
    let err = plan_on("lamed-phi3-mini-stage2", "a100-40gb");
    assert!(
        err.contains("GiB per GPU")
            && err.contains("a100-40gb")
            && err.contains("train.micro_batch of at most 4"),
        "{err}"
    );
    // Llama-3 stage 2 trains 1.3B parameters in full (its 128K-row embeddings and lm_head): no micro-batch
    // makes that fit.
    let err = plan_on("lamed-llama3-8b-stage2", "a100-40gb");
    assert!(
        err.contains("weights and optimizer state alone exceed"),
        "{err}"
    );
    // Unknown names are refused, naming the known ones.
    let recipe = root().join("recipes/clip.yaml");
    let out = m3d(&[
        "plan",
        recipe.to_str().unwrap(),
        "--gpu",
        "tpu",
        "--samples",
        "1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("h100-80gb"), "{err}");
}
