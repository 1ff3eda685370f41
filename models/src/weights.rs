//! Weight files in and out: safetensors (one file, or sharded with `model.safetensors.index.json`) and
//! PyTorch `.bin` state dicts (`torch.save` zip archives); key remapping; strict loading that lists every
//! missing, unexpected and mis-shaped key; HF-compatible safetensors writing.
//!
//! **Invariant: a written weight file is complete or absent** — files are written under a temporary name and
//! renamed into place.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tch::nn::VarStore;
use tch::{Kind, Tensor};

use crate::error::{read_json, ModelError, Result};

/// Reads every tensor of a weight file or model folder, on the CPU.
///
/// `path` may be a `.safetensors` file, a `*.index.json` of a sharded checkpoint, a `.bin`/`.pt`/`.pth`
/// state dict, or a folder holding one of `model.safetensors.index.json`, `model.safetensors`,
/// `pytorch_model.bin.index.json`, `pytorch_model.bin` (tried in that order).
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.exists() {
        // Said first: a missing path has no format, and "unknown weight format" would send the user looking
        // at the wrong thing.
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    if path.is_dir() {
        for name in [
            "model.safetensors.index.json",
            "model.safetensors",
            "pytorch_model.bin.index.json",
            "pytorch_model.bin",
        ] {
            let p = path.join(name);
            if p.is_file() {
                return read_tensors(&p);
            }
        }
        return Err(ModelError::weights(
            path,
            "no model.safetensors(.index.json) or pytorch_model.bin(.index.json) in this folder",
        ));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with(".index.json") {
        read_sharded(path)
    } else if name.ends_with(".safetensors") {
        read_safetensors(path)
    } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
        read_torch_bin(path)
    } else {
        Err(ModelError::weights(
            path,
            "unknown weight format (expected .safetensors, .bin, .pt, .pth or *.index.json)",
        ))
    }
}

/// One safetensors file.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    Tensor::read_safetensors(path).map_err(|e| ModelError::weights(path, e.to_string()))
}

/// A `torch.save` zip archive holding a flat `{name: tensor}` dict (HF `pytorch_model.bin`, M3D's
/// `pretrained_ViT.bin`).
pub fn read_torch_bin(path: &Path) -> Result<Vec<(String, Tensor)>> {
    if !path.is_file() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    Tensor::loadz_multi(path)
        .map_err(|e| ModelError::weights(path, format!("not a torch.save state dict: {e}")))
}

#[derive(serde::Deserialize, serde::Serialize)]
struct ShardIndex {
    #[serde(default)]
    metadata: serde_json::Value,
    weight_map: BTreeMap<String, String>,
}

/// A sharded checkpoint: the index names, for every key, the file that holds it (next to the index).
pub fn read_sharded(index: &Path) -> Result<Vec<(String, Tensor)>> {
    let idx: ShardIndex = read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let files: Vec<&String> = {
        let mut seen = HashSet::new();
        idx.weight_map
            .values()
            .filter(|f| seen.insert(*f))
            .collect()
    };
    let mut out = Vec::with_capacity(idx.weight_map.len());
    for file in files {
        if file.contains('/') || file.contains("..") {
            return Err(ModelError::weights(
                index,
                format!("shard file name `{file}` must be a plain file name"),
            ));
        }
        let tensors = read_tensors(&dir.join(file))?;
        for (k, t) in tensors {
            match idx.weight_map.get(&k) {
                Some(f) if f == file => out.push((k, t)),
                _ => {
                    return Err(ModelError::weights(
                        dir.join(file),
                        format!("holds `{k}`, which the index does not assign to this file"),
                    ))
                }
            }
        }
    }
    let got: HashSet<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
    if let Some(k) = idx.weight_map.keys().find(|k| !got.contains(k.as_str())) {
        return Err(ModelError::weights(
            index,
            format!(
                "`{k}` is listed in the index but missing from {}",
                idx.weight_map[k]
            ),
        ));
    }
    Ok(out)
}

/// Renames checkpoint keys before they are matched to model parameters.
///
/// Rules are `(from_prefix, to_prefix)` pairs tried in order; the first whose prefix matches rewrites the
/// key. With `select`, keys no rule matches are dropped (e.g. load only `vision_encoder.*` of a CLIP
/// checkpoint into a ViT); otherwise they pass unchanged.
#[derive(Debug, Clone, Default)]
pub struct KeyMap {
    rules: Vec<(String, String)>,
    select: bool,
}

impl KeyMap {
    pub fn identity() -> Self {
        Self::default()
    }

    /// Keep only the keys under `prefix`, with the prefix removed.
    pub fn select_prefix(prefix: &str) -> Self {
        KeyMap {
            rules: vec![(prefix.to_string(), String::new())],
            select: true,
        }
    }

    /// Keep only the keys under `from`, with `from` replaced by `to` (e.g. the ViT of an M3D-CLIP checkpoint,
    /// `vision_encoder.`, into LaMed's `model.vision_tower.vision_tower.`).
    pub fn move_prefix(from: &str, to: &str) -> Self {
        KeyMap {
            rules: vec![(from.to_string(), to.to_string())],
            select: true,
        }
    }

    /// Also rewrite keys starting with `from` to start with `to`.
    pub fn rename(mut self, from: &str, to: &str) -> Self {
        self.rules.push((from.to_string(), to.to_string()));
        self
    }

    /// Put `prefix` in front of every key (e.g. a bare ViT checkpoint into LaMed's vision tower).
    pub fn add_prefix(prefix: &str) -> Self {
        KeyMap {
            rules: vec![(String::new(), prefix.to_string())],
            select: false,
        }
    }

    pub fn apply(&self, key: &str) -> Option<String> {
        for (from, to) in &self.rules {
            if let Some(rest) = key.strip_prefix(from.as_str()) {
                return Some(format!("{to}{rest}"));
            }
        }
        (!self.select).then(|| key.to_string())
    }
}

/// What a load found: the parameters it filled and every disagreement between checkpoint and model.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// Model parameters the checkpoint does not have.
    pub missing: Vec<String>,
    /// Checkpoint keys the model does not have.
    pub unexpected: Vec<String>,
    /// (key, model shape, checkpoint shape).
    pub mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
}

impl LoadReport {
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mismatched.is_empty()
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 20;
        fn list(f: &mut fmt::Formatter<'_>, title: &str, items: &[String]) -> fmt::Result {
            if items.is_empty() {
                return Ok(());
            }
            writeln!(f, "  {title} ({}):", items.len())?;
            for k in items.iter().take(SHOWN) {
                writeln!(f, "    {k}")?;
            }
            if items.len() > SHOWN {
                writeln!(f, "    ... and {} more", items.len() - SHOWN)?;
            }
            Ok(())
        }
        list(f, "missing from the checkpoint", &self.missing)?;
        list(f, "unexpected in the checkpoint", &self.unexpected)?;
        let shapes: Vec<String> = self
            .mismatched
            .iter()
            .map(|(k, m, c)| format!("{k}: model {m:?}, checkpoint {c:?}"))
            .collect();
        list(f, "shape mismatch", &shapes)?;
        write!(f, "  ({} parameters match)", self.loaded)
    }
}

/// How a checkpoint is matched to a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Fail on any missing, unexpected or mis-shaped key (the default). The reference loads leniently, which
    /// once left the segmentation module silently at its random initialisation.
    pub strict: bool,
    pub key_map: KeyMap,
    /// Model parameters that may be absent from the checkpoint (by prefix or substring), e.g. `lora_` when
    /// loading base weights into a model with adapters, or the parts a stage adds.
    pub allow_missing: Vec<String>,
    /// Checkpoint keys (by prefix or substring, after the key map) that are skipped without complaint, e.g.
    /// BERT's `embeddings.position_ids` buffer that older transformers versions saved.
    pub ignore_unexpected: Vec<String>,
    /// Only the model parameters under this prefix must be in the checkpoint (a component loaded into its
    /// place in a larger model, e.g. SegVol into `model.seg_module.`); the rest is not "missing".
    pub scope: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            strict: true,
            key_map: KeyMap::identity(),
            allow_missing: Vec::new(),
            ignore_unexpected: Vec::new(),
            scope: None,
        }
    }
}

impl LoadOptions {
    pub fn lenient() -> Self {
        LoadOptions {
            strict: false,
            ..Default::default()
        }
    }
    pub fn with_key_map(mut self, key_map: KeyMap) -> Self {
        self.key_map = key_map;
        self
    }
    pub fn allow_missing(mut self, pattern: &str) -> Self {
        self.allow_missing.push(pattern.to_string());
        self
    }
    pub fn ignore_unexpected(mut self, pattern: &str) -> Self {
        self.ignore_unexpected.push(pattern.to_string());
        self
    }
    pub fn within(mut self, prefix: &str) -> Self {
        self.scope = Some(prefix.to_string());
        self
    }
}

/// Copies checkpoint tensors into the variables of `vs` by name (after the key map), converting dtype and
/// device to the variable's. In strict mode nothing is copied unless everything matches.
pub fn load_into(
    vs: &VarStore,
    tensors: Vec<(String, Tensor)>,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    load_into_vars(&vs.variables(), tensors, opts)
}

/// [`load_into`] for an explicit set of target variables (e.g. only the adapters of a model).
pub fn load_into_vars(
    vars: &HashMap<String, Tensor>,
    tensors: Vec<(String, Tensor)>,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    let mut report = LoadReport::default();
    let mut matched: Vec<(Tensor, Tensor)> = Vec::new();
    let mut seen = HashSet::new();
    for (key, t) in tensors {
        let Some(name) = opts.key_map.apply(&key) else {
            continue;
        };
        match vars.get(&name) {
            None if opts
                .ignore_unexpected
                .iter()
                .any(|p| name.starts_with(p.as_str()) || name.contains(p.as_str())) => {}
            None => report.unexpected.push(key),
            Some(var) => {
                seen.insert(name.clone());
                if var.size() != t.size() {
                    report.mismatched.push((name, var.size(), t.size()));
                } else {
                    matched.push((var.shallow_clone(), t));
                }
            }
        }
    }
    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| !seen.contains(*k))
        .filter(|k| {
            opts.scope
                .as_ref()
                .is_none_or(|s| k.starts_with(s.as_str()))
        })
        .filter(|k| {
            !opts
                .allow_missing
                .iter()
                .any(|p| k.starts_with(p.as_str()) || k.contains(p.as_str()))
        })
        .cloned()
        .collect();
    missing.sort();
    report.missing = missing;
    report.unexpected.sort();
    report.mismatched.sort();
    report.loaded = matched.len();
    if opts.strict && !report.is_clean() {
        return Err(ModelError::StateDict(report));
    }
    tch::no_grad(|| -> Result<()> {
        for (mut var, t) in matched {
            var.f_copy_(&t)?;
        }
        Ok(())
    })?;
    if !report.is_clean() {
        tracing::warn!("lenient load:\n{report}");
    }
    Ok(report)
}

/// Reads `path` (see [`read_tensors`]) and loads it into `vs`.
pub fn load_file_into(vs: &VarStore, path: &Path, opts: &LoadOptions) -> Result<LoadReport> {
    load_read_into(vs, path, read_tensors(path)?, opts)
}

/// [`load_into`] of the `tensors` already read from `path` (for callers that look at the keys first); a
/// mismatch names the file.
pub fn load_read_into(
    vs: &VarStore,
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    load_into(vs, tensors, opts).map_err(|e| match e {
        ModelError::StateDict(r) => {
            ModelError::weights(path, format!("does not match the model:\n{r}"))
        }
        other => other,
    })
}

/// The variables of `vs`, sorted by name (what `state_dict()` gives in PyTorch, up to order).
pub fn state_dict(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// A tensor copied to host memory in safetensors' terms (dtype, shape, little-endian bytes). The bytes are
/// reference-counted, so handing them to an upload (and retrying it) copies nothing.
pub struct HostTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Bytes,
}

impl HostTensor {
    /// Bytes of data.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Copies `tensors` to host memory, one copy each.
pub fn to_host_tensors(tensors: &[(String, Tensor)]) -> Result<Vec<(String, HostTensor)>> {
    to_host_tensors_into(tensors, Vec::new())
}

/// Below this many bytes a staging copy runs on the calling thread: starting threads costs more.
const PARALLEL_STAGING_BYTES: usize = 64 << 20;

/// [`to_host_tensors`] into the buffers of `spare`, an earlier copy of the same tensors that nothing shares
/// any more (a finished checkpoint upload): this is the part of a checkpoint that stops training, and fresh
/// memory costs a page fault per 4 KiB, which made staging run at a third of memory bandwidth. Large states
/// are also spread over the machine's cores. A spare buffer that is still shared or of another size is not
/// reused.
pub fn to_host_tensors_into(
    tensors: &[(String, Tensor)],
    spare: Vec<(String, HostTensor)>,
) -> Result<Vec<(String, HostTensor)>> {
    let mut spare: HashMap<String, Bytes> = spare.into_iter().map(|(k, h)| (k, h.data)).collect();
    let total: usize = tensors.iter().map(|(_, t)| tensor_bytes(t)).sum();
    let threads = if total < PARALLEL_STAGING_BYTES {
        1
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(tensors.len().max(1))
    };
    if threads <= 1 {
        return tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), to_host(k, t, spare.remove(k))?)))
            .collect();
    }
    // Balance by bytes: tensor i goes to the thread with the least assigned so far (largest first).
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tensor_bytes(&tensors[i].1)));
    let mut load = vec![0usize; threads];
    type Work = (usize, String, Tensor, Option<Bytes>);
    let mut work: Vec<Vec<Work>> = (0..threads).map(|_| Vec::new()).collect();
    for i in order {
        let (w, _) = load
            .iter()
            .enumerate()
            .min_by_key(|(_, l)| **l)
            .unwrap_or((0, &0));
        load[w] += tensor_bytes(&tensors[i].1);
        // A shallow clone is a new handle to the same storage, which may move to another thread.
        let name = &tensors[i].0;
        work[w].push((
            i,
            name.clone(),
            tensors[i].1.shallow_clone(),
            spare.remove(name),
        ));
    }
    let mut out: Vec<Option<HostTensor>> = (0..tensors.len()).map(|_| None).collect();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = work
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|(i, name, t, reuse)| Ok((i, to_host(&name, &t, reuse)?)))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        for h in handles {
            let done = h
                .join()
                .map_err(|_| ModelError::Input("a staging thread panicked".into()))??;
            for (i, host) in done {
                out[i] = Some(host);
            }
        }
        Ok(())
    })?;
    tensors
        .iter()
        .zip(out)
        .map(|((k, _), h)| {
            h.map(|h| (k.clone(), h))
                .ok_or_else(|| ModelError::Input(format!("tensor `{k}` was not staged")))
        })
        .collect()
}

/// Bytes of a tensor's data.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// The byte size of each named tensor (its metadata only: sizes can be taken to another thread, tensors not).
pub fn byte_sizes(tensors: &[(String, Tensor)]) -> Vec<(String, usize)> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), tensor_bytes(t)))
        .collect()
}

/// Host buffers of the given byte sizes, by name, every page already written: memory for
/// [`to_host_tensors_into`] to copy into without page faults, prepared off the critical path.
pub fn host_buffers(sizes: &[(String, usize)]) -> Vec<(String, HostTensor)> {
    sizes
        .iter()
        .map(|(name, len)| {
            (
                name.clone(),
                HostTensor {
                    dtype: safetensors::Dtype::U8,
                    shape: vec![*len],
                    // A non-zero fill: zeroed memory would come from calloc untouched.
                    data: Bytes::from(vec![0xA5u8; *len]),
                },
            )
        })
        .collect()
}

/// A safetensors file holding host tensors (metadata `format: pt`) as a list of buffers: the header, then each
/// tensor's bytes, shared with `host` rather than copied. Written one after the other they are the file.
pub fn safetensors_parts(host: &[(String, HostTensor)]) -> Result<Vec<Bytes>> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0usize;
    for (k, t) in host {
        let entry = serde_json::json!({
            "dtype": t.dtype,
            "shape": t.shape,
            "data_offsets": [offset, offset + t.data.len()],
        });
        if header.insert(k.clone(), entry).is_some() || k == "__metadata__" {
            return Err(ModelError::Input(format!("key `{k}` given twice")));
        }
        offset += t.data.len();
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| ModelError::Input(format!("serialising a safetensors header: {e}")))?;
    // The format pads the header with spaces so that the data starts 8-byte aligned.
    while (json.len() + 8) % 8 != 0 {
        json.push(b' ');
    }
    let mut head = Vec::with_capacity(8 + json.len());
    head.extend_from_slice(&(json.len() as u64).to_le_bytes());
    head.extend_from_slice(&json);
    let mut parts = Vec::with_capacity(host.len() + 1);
    parts.push(Bytes::from(head));
    parts.extend(host.iter().map(|(_, t)| t.data.clone()));
    Ok(parts)
}

/// libtorch's kind for a safetensors dtype.
fn kind_of(dtype: safetensors::Dtype, name: &str, origin: &Path) -> Result<Kind> {
    use safetensors::Dtype;
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        d => {
            return Err(ModelError::weights(
                origin,
                format!("tensor `{name}`: unsupported dtype {d:?}"),
            ))
        }
    })
}

/// The tensors of a safetensors file held in memory (`origin` names it in errors), on the CPU.
pub fn read_safetensors_bytes(bytes: &[u8], origin: &Path) -> Result<Vec<(String, Tensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| ModelError::weights(origin, e.to_string()))?;
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let kind = kind_of(view.dtype(), &name, origin)?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_data_size(view.data(), &shape, kind)
                .map_err(|e| ModelError::weights(origin, format!("tensor `{name}`: {e}")))?;
            Ok((name, t))
        })
        .collect()
}

/// Largest safetensors header accepted (the format's own reader uses the same bound).
const MAX_HEADER: u64 = 100_000_000;

/// The tensors of a safetensors file of `len` bytes read from `reader` straight into their own memory, on the
/// CPU: one copy, as `torch.load` makes, where [`read_safetensors_bytes`] needs the whole file in memory
/// first. Every byte read is passed to `observe` in file order (for a checksum). `into(name)` may offer an
/// existing tensor to read that entry into (a model's parameter, when resuming): used if it is a contiguous
/// CPU tensor of the entry's shape and dtype, which saves allocating (and page-faulting) fresh memory and the
/// copy into the parameter afterwards; it is then the tensor returned. The layout is checked as the format's
/// own reader checks it: known dtypes, sizes that match shapes, data that covers the file exactly.
// One unsafe block: the file is read into the fresh tensor's own storage (safe Rust would need a staging
// buffer and a second copy, the cost this function exists to avoid).
#[allow(unsafe_code)]
pub fn read_safetensors_from(
    reader: &mut dyn std::io::Read,
    len: u64,
    origin: &Path,
    observe: &mut dyn FnMut(&[u8]),
    into: &mut dyn FnMut(&str) -> Option<Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let bad = |m: String| ModelError::weights(origin, m);
    let mut n = [0u8; 8];
    reader
        .read_exact(&mut n)
        .map_err(|e| bad(format!("reading the header length: {e}")))?;
    observe(&n);
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || n > len.saturating_sub(8) {
        return Err(bad(format!("a header of {n} bytes in a file of {len}")));
    }
    let mut header = vec![0u8; n as usize];
    reader
        .read_exact(&mut header)
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    observe(&header);
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    #[derive(serde::Deserialize)]
    struct Entry {
        dtype: safetensors::Dtype,
        shape: Vec<usize>,
        data_offsets: (u64, u64),
    }
    let mut entries = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name == "__metadata__" {
            continue;
        }
        let e: Entry =
            serde_json::from_value(v).map_err(|e| bad(format!("header entry `{name}`: {e}")))?;
        entries.push((name, e));
    }
    entries.sort_by_key(|(_, e)| e.data_offsets);
    let data_len = len - 8 - n;
    let mut at = 0u64;
    let mut out = Vec::with_capacity(entries.len());
    for (name, e) in entries {
        let kind = kind_of(e.dtype, &name, origin)?;
        let (begin, end) = e.data_offsets;
        let numel: usize = e.shape.iter().product();
        let nbytes = numel * kind.elt_size_in_bytes();
        if begin != at || end < begin || end - begin != nbytes as u64 || end > data_len {
            return Err(bad(format!(
                "tensor `{name}`: data at {begin}..{end} where {nbytes} bytes at {at} were expected"
            )));
        }
        let shape: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
        let offered = into(&name).filter(|t| {
            t.size() == shape
                && t.kind() == kind
                && t.device() == tch::Device::Cpu
                && t.is_contiguous()
        });
        let t = match offered {
            Some(t) => t,
            None => Tensor::f_empty(&shape, (kind, tch::Device::Cpu))?,
        };
        if nbytes > 0 {
            // SAFETY: `t` is a contiguous CPU tensor of exactly `nbytes` bytes (checked above), written here
            // as `copy_` would write it; any bit pattern is a valid value of these dtypes, except for bool,
            // which is checked before the tensor is returned.
            let buf = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, nbytes) };
            reader
                .read_exact(buf)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            if kind == Kind::Bool && buf.iter().any(|&b| b > 1) {
                return Err(bad(format!(
                    "tensor `{name}`: a bool that is neither 0 nor 1"
                )));
            }
            observe(buf);
        }
        at = end;
        out.push((name, t));
    }
    if at != data_len {
        return Err(bad(format!(
            "the tensors cover {at} of the file's {data_len} data bytes"
        )));
    }
    Ok(out)
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_host(name: &str, t: &Tensor, reuse: Option<Bytes>) -> Result<HostTensor> {
    use safetensors::Dtype;
    let (dtype, elt) = match t.kind() {
        Kind::Float => (Dtype::F32, 4),
        Kind::Half => (Dtype::F16, 2),
        Kind::BFloat16 => (Dtype::BF16, 2),
        Kind::Double => (Dtype::F64, 8),
        Kind::Int64 => (Dtype::I64, 8),
        Kind::Int => (Dtype::I32, 4),
        Kind::Int16 => (Dtype::I16, 2),
        Kind::Int8 => (Dtype::I8, 1),
        Kind::Uint8 => (Dtype::U8, 1),
        Kind::Bool => (Dtype::BOOL, 1),
        k => {
            return Err(ModelError::Input(format!(
                "tensor `{name}`: dtype {k:?} cannot be written to safetensors"
            )))
        }
    };
    let t = t.detach().to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let reused = reuse
        .filter(|b| b.len() == numel * elt)
        .and_then(|b| b.try_into_mut().ok());
    let data = match reused {
        Some(mut buf) => {
            t.f_copy_data_u8(&mut buf, numel)?;
            buf.freeze()
        }
        None => {
            let mut data = vec![0u8; numel * elt];
            t.f_copy_data_u8(&mut data, numel)?;
            Bytes::from(data)
        }
    };
    Ok(HostTensor { dtype, shape, data })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes one HF-compatible safetensors file (metadata `format: pt`), atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_host(path, &to_host_tensors(tensors)?)
}

fn write_host(path: &Path, host: &[(String, HostTensor)]) -> Result<()> {
    let mut seen = HashSet::new();
    if let Some((dup, _)) = host.iter().find(|(k, _)| !seen.insert(k.as_str())) {
        return Err(ModelError::weights(
            path,
            format!("key `{dup}` given twice"),
        ));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(host.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), &tmp)
        .map_err(|e| ModelError::weights(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
}

/// Writes a sharded HF checkpoint into `dir`: `model-0000i-of-0000n.safetensors` files of at most
/// `max_shard_bytes` each (a larger tensor gets a file of its own) and `model.safetensors.index.json`,
/// written last. A single shard is written as plain `model.safetensors`, as `save_pretrained` does.
pub fn save_sharded(
    dir: &Path,
    tensors: &[(String, Tensor)],
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut shards: Vec<Vec<(String, HostTensor)>> = vec![Vec::new()];
    let mut size = 0usize;
    let mut total = 0usize;
    for (k, t) in tensors {
        let h = to_host(k, t, None)?;
        let n = h.data.len();
        if size > 0 && size + n > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        total += n;
        if let Some(s) = shards.last_mut() {
            s.push((k.clone(), h));
        }
    }
    if shards.len() == 1 {
        return write_host(&dir.join("model.safetensors"), &shards[0]);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        write_host(&dir.join(&file), shard)?;
        for (k, _) in shard {
            weight_map.insert(k.clone(), file.clone());
        }
    }
    let index = ShardIndex {
        metadata: serde_json::json!({ "total_size": total }),
        weight_map,
    };
    let path = dir.join("model.safetensors.index.json");
    let tmp = tmp_path(&path);
    let text = serde_json::to_string_pretty(&index).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    std::fs::write(&tmp, text).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| ModelError::io(&path, e))
}
