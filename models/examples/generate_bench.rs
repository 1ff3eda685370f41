//! Greedy generation timing of our decoder, driven by `bench/generate.py` (a benchmark, not a test).
//!
//! usage: generate_bench <dir> --batch B --prompt-len P --new N [--threads T] [--rounds R]
//!
//! `<dir>` holds the HF model the Python side times (`config.json`, `weights.safetensors`, loaded strictly) and
//! `prompts.safetensors` (`ids`: (8, P) token ids). Rows `0..B` are the prompts; decoding is greedy with no end
//! token, so every row makes exactly N tokens. Prints one JSON line: the seconds of each round (prefill included,
//! as `generate` is timed) and the tokens of row 0 (checked against transformers' by the script).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use m3d_models::generate::{generate, GenerateOptions};
use m3d_models::llm::{CausalLm, LlmConfig};
use m3d_models::weights::{load_file_into, read_tensors, LoadOptions};
use m3d_models::VarBuilder;
use tch::nn::VarStore;
use tch::Device;

fn flag(args: &[String], name: &str, default: usize) -> Result<usize> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context(format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} needs a number")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = Path::new(
        args.get(1)
            .context("usage: generate_bench <dir> --batch B --prompt-len P --new N")?,
    );
    let (batch, new) = (flag(&args, "--batch", 1)?, flag(&args, "--new", 32)?);
    let prompt_len = flag(&args, "--prompt-len", 64)? as i64;
    let rounds = flag(&args, "--rounds", 3)?;
    tch::set_num_threads(flag(&args, "--threads", 1)? as i32);
    let cfg = LlmConfig::from_file(&dir.join("config.json"))?;
    let vs = VarStore::new(Device::Cpu);
    let model = CausalLm::new(&VarBuilder::new(&vs), &cfg)?;
    load_file_into(
        &vs,
        &dir.join("weights.safetensors"),
        &LoadOptions::default(),
    )?;
    let prompts = read_tensors(&dir.join("prompts.safetensors"))?;
    let ids = &prompts
        .iter()
        .find(|(k, _)| k == "ids")
        .context("prompts.safetensors has no `ids`")?
        .1;
    let ids = ids.narrow(0, 0, batch as i64).narrow(1, 0, prompt_len);
    let opts = GenerateOptions::greedy(new, &[]);
    let mut seconds = Vec::new();
    let mut first = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        let embeds = model.embed_tokens(&ids)?;
        let out = generate(&model, &embeds, None, &opts)?;
        seconds.push(start.elapsed().as_secs_f64());
        first = out.into_iter().next().unwrap_or_default();
    }
    println!(
        "{}",
        serde_json::json!({"seconds": seconds, "tokens": first, "batch": batch, "new": new})
    );
    Ok(())
}
