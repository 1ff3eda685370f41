//! Weight I/O against PyTorch/safetensors written by the oracle: single and sharded safetensors, `.bin`,
//! strict-load reports, key maps, and our files read back by Python.
mod common;
