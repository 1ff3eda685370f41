//! Text tokenisation through Hugging Face `tokenizers` from a `tokenizer.json` (the file HF "fast" tokenizers
//! save), with the batch padding/truncation behaviour of `tokenizer(texts, padding=..., truncation=True,
//! max_length=...)` in `transformers`: truncation keeps the special tokens (e.g. `[CLS] ... [SEP]`), padding is on
//! the right with the tokenizer's pad token, the attention mask is 1 on tokens and 0 on padding.
//!
//! Padding and truncation settings stored inside `tokenizer.json` are ignored: every call states its own, so a
//! file saved with `max_length=128` does not silently cap a 512-token run.

use std::path::{Path, PathBuf};

use tch::Tensor;
use tokenizers::{AddedToken, Encoding, TruncationDirection};

use crate::error::{ModelError, Result};

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Every row to `max_len` (`padding="max_length"`; what M3D-CLIP does, with 512).
    MaxLength,
    /// Every row to the longest row of the batch (`padding="longest"`).
    Longest,
}

/// A tokenised batch: (B, T) int64 `input_ids` and `attention_mask` on the CPU.
#[derive(Debug)]
pub struct Encoded {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// Tokens per row before padding.
    pub lengths: Vec<i64>,
}

/// A `tokenizer.json` tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pad: Option<(String, u32)>,
    eos: Option<(String, u32)>,
}

/// The special tokens of a `tokenizer_config.json` (a token is a string or `{"content": ...}`).
#[derive(Default)]
struct ConfigTokens {
    pad: Option<String>,
    eos: Option<String>,
}

impl ConfigTokens {
    fn read(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Ok(Self::default());
        }
        let value: serde_json::Value = crate::error::read_json(path)?;
        let token = |key: &str| match value.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => v.get("content").and_then(|c| c.as_str()).map(String::from),
            None => None,
        };
        Ok(ConfigTokens {
            pad: token("pad_token"),
            eos: token("eos_token"),
        })
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size(true))
            .field("pad", &self.pad)
            .finish()
    }
}

impl Tokenizer {
    /// Loads `path`: a `tokenizer.json`, or a folder holding one.
    ///
    /// The pad token is the one `tokenizer.json`'s padding section names, else `[PAD]` or `<pad>` if the
    /// vocabulary has them, else none (set one with [`Tokenizer::set_pad_token`] before padding a batch; Llama-2
    /// has none, and M3D pads it with `<unk>`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        if !file.is_file() {
            return Err(ModelError::Tokenizer {
                path: file,
                message: "no such file".into(),
            });
        }
        let mut inner =
            tokenizers::Tokenizer::from_file(&file).map_err(|e| ModelError::Tokenizer {
                path: file.clone(),
                message: e.to_string(),
            })?;
        let from_file_padding = inner.get_padding().map(|p| (p.pad_token.clone(), p.pad_id));
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer {
                path: file.clone(),
                message: e.to_string(),
            })?;
        // `tokenizer_config.json` beside it names the special tokens, as transformers reads them.
        let config = ConfigTokens::read(&file.with_file_name("tokenizer_config.json"))?;
        let known = |t: &Option<String>| {
            t.as_ref()
                .and_then(|t| inner.token_to_id(t).map(|id| (t.clone(), id)))
        };
        let pad = from_file_padding
            .or_else(|| known(&config.pad))
            .or_else(|| {
                ["[PAD]", "<pad>"]
                    .iter()
                    .find_map(|t| inner.token_to_id(t).map(|id| (t.to_string(), id)))
            });
        let eos = known(&config.eos);
        Ok(Tokenizer {
            inner,
            path: file,
            pad,
            eos,
        })
    }

    /// The end-of-sequence token `tokenizer_config.json` names (`eos_token`), if there is one.
    pub fn config_eos_token(&self) -> Option<(&str, i64)> {
        self.eos
            .as_ref()
            .map(|(t, id)| (t.as_str(), i64::from(*id)))
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, message: impl Into<String>) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// Vocabulary size, with or without the added tokens (the embedding rows a model needs is `true`).
    pub fn vocab_size(&self, with_added_tokens: bool) -> usize {
        self.inner.get_vocab_size(with_added_tokens)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    pub fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id)
            .ok()
            .and_then(|id| self.inner.id_to_token(id))
    }

    /// The pad token and its id, if any.
    pub fn pad_token(&self) -> Option<(&str, i64)> {
        self.pad
            .as_ref()
            .map(|(t, id)| (t.as_str(), i64::from(*id)))
    }

    /// Pads with `token` (which must be in the vocabulary), e.g. `<unk>` for Llama-2 as M3D does.
    pub fn set_pad_token(&mut self, token: &str) -> Result<()> {
        let id = self
            .inner
            .token_to_id(token)
            .ok_or_else(|| self.err(format!("pad token `{token}` is not in the vocabulary")))?;
        self.pad = Some((token.to_string(), id));
        Ok(())
    }

    /// Adds special tokens (never split, not normalised, skipped by `decode(.., true)`), like
    /// `tokenizer.add_special_tokens({"additional_special_tokens": [...]})`. Returns how many were new.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Result<usize> {
        let tokens = tokens.iter().map(|t| AddedToken::from(t.to_string(), true));
        self.inner
            .add_special_tokens(tokens)
            .map_err(|e| self.err(e.to_string()))
    }

    /// Adds ordinary tokens (normalised, kept by decode), like `tokenizer.add_tokens([...])`. Returns how many
    /// were new.
    pub fn add_tokens(&mut self, tokens: &[&str]) -> Result<usize> {
        let tokens = tokens
            .iter()
            .map(|t| AddedToken::from(t.to_string(), false));
        self.inner
            .add_tokens(tokens)
            .map_err(|e| self.err(e.to_string()))
    }

    /// One text to ids, without padding or truncation.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| self.err(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Ids back to text (`skip_special_tokens` as in HF).
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&i| u32::try_from(i).map_err(|_| self.err(format!("cannot decode id {i}"))))
            .collect::<Result<_>>()?;
        self.inner
            .decode(&ids, skip_special_tokens)
            .map_err(|e| self.err(e.to_string()))
    }

    /// Tokenises a batch with special tokens, truncated to `max_len` tokens (special tokens included) when
    /// `truncation`, and padded on the right per `padding`. Without truncation a row longer than `max_len` is an
    /// error under [`Padding::MaxLength`] (HF would return ragged rows), and `max_len` is unused under
    /// [`Padding::Longest`].
    pub fn encode_batch<S: AsRef<str>>(
        &self,
        texts: &[S],
        max_len: usize,
        padding: Padding,
        truncation: bool,
    ) -> Result<Encoded> {
        if texts.is_empty() {
            return Err(self.err("encode_batch: empty batch"));
        }
        let n_special = self
            .inner
            .get_post_processor()
            .map(|p| tokenizers::PostProcessor::added_tokens(p, false))
            .unwrap_or(0);
        if truncation && max_len < n_special {
            return Err(self.err(format!(
                "max_len {max_len} leaves no room for the {n_special} special tokens"
            )));
        }
        let inputs: Vec<&str> = texts.iter().map(|t| t.as_ref()).collect();
        // Encode without special tokens, truncate the content, then add the special tokens: the order
        // `tokenizers` itself uses, so `[SEP]` survives truncation.
        let raw = self
            .inner
            .encode_batch(inputs, false)
            .map_err(|e| self.err(e.to_string()))?;
        let encodings: Vec<Encoding> = raw
            .into_iter()
            .map(|mut enc| {
                if truncation {
                    enc.truncate(max_len - n_special, 0, TruncationDirection::Right);
                }
                self.inner
                    .post_process(enc, None, true)
                    .map_err(|e| self.err(e.to_string()))
            })
            .collect::<Result<_>>()?;
        let lengths: Vec<usize> = encodings.iter().map(|e| e.get_ids().len()).collect();
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let width = match padding {
            Padding::MaxLength => {
                if longest > max_len {
                    return Err(self.err(format!(
                        "a text has {longest} tokens, more than max_len {max_len}, and truncation is off"
                    )));
                }
                max_len
            }
            Padding::Longest => longest,
        };
        let needs_pad = lengths.iter().any(|&l| l < width);
        let pad_id = match (&self.pad, needs_pad) {
            (Some((_, id)), _) => i64::from(*id),
            (None, false) => 0,
            (None, true) => {
                return Err(self.err("the batch needs padding but the tokenizer has no pad token"))
            }
        };
        let b = encodings.len();
        let mut ids = vec![pad_id; b * width];
        let mut mask = vec![0i64; b * width];
        for (row, enc) in encodings.iter().enumerate() {
            for (j, &id) in enc.get_ids().iter().enumerate() {
                ids[row * width + j] = i64::from(id);
                mask[row * width + j] = 1;
            }
        }
        let shape = [b as i64, width as i64];
        Ok(Encoded {
            input_ids: Tensor::from_slice(&ids).reshape(shape),
            attention_mask: Tensor::from_slice(&mask).reshape(shape),
            lengths: lengths.iter().map(|&l| l as i64).collect(),
        })
    }
}
