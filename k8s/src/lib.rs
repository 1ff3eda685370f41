//! Kubernetes manifests for m3d jobs, built from typed structs (`k8s-openapi` for the core kinds, the JobSet
//! CRD's generated bindings `kcr_jobset_x_k8s_io::v1alpha2` for the JobSet) and serialised to YAML.
//!
//! What this crate owns: the shape of a training job on a cluster — which pods, their commands, the failure
//! rules that make a preemption free and other failures count, the stable coordinator address, shared memory,
//! secrets, the grace period — and the same for a data-prep conversion split over pods. It knows nothing of
//! tensors or shards: the CLI hands it the effective recipe and the checkpoint size, and writes the objects.
//! **Invariant: `worker` knows nothing about Kubernetes**; everything a pod needs reaches the process as flags,
//! environment variables and mounted files.

mod eval;
mod objects;
mod pod;
mod prep;
mod train;

pub use eval::{render_eval, EvalJob};
pub use objects::{to_yaml_documents, Object};
pub use prep::{render_prep, PrepJob};
pub use train::{coordinator_host, grace_period_s, render_train, Flavor, TrainJob};

/// The port the coordinator serves gRPC (and the gRPC health service its readiness probe asks) on.
pub const COORDINATOR_PORT: u16 = 7070;
/// Where a pod finds the job's recipe (the rendered ConfigMap, mounted read-only).
pub const RECIPE_DIR: &str = "/etc/m3d";
/// The recipe's file name inside [`RECIPE_DIR`].
pub const RECIPE_FILE: &str = "recipe.yaml";
/// The key of the job token in its Secret.
pub const TOKEN_KEY: &str = "token";
/// The user and group m3d's containers run as (the image's non-root `m3d` user).
pub const RUN_AS: i64 = 65532;

/// Why a job could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// A name that Kubernetes would refuse (it becomes part of pod host names).
    #[error("`{name}` is not a usable {what}: {why}")]
    Name {
        what: &'static str,
        name: String,
        why: String,
    },
    /// A recipe value that cannot work on a cluster.
    #[error("recipe key `{key}` = `{value}`: {why}")]
    Recipe {
        key: String,
        value: String,
        why: String,
    },
    /// A flag's value out of range.
    #[error("{flag}: {why}")]
    Option { flag: &'static str, why: String },
    /// Typed objects that did not survive the conversion into the JobSet's generated types: a field the
    /// JobSet bindings do not know would be dropped silently, so rendering stops instead.
    #[error("the JobSet bindings lost fields of the {what}: {detail}")]
    Conversion { what: String, detail: String },
    #[error("serialising the {what}: {source}")]
    Serialise {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing YAML for the {what}: {source}")]
    Yaml {
        what: String,
        #[source]
        source: serde_yaml::Error,
    },
}

/// Checks `name` as a DNS-1123 label of at most `max` characters (Kubernetes derives pod host names from it).
pub fn check_name(what: &'static str, name: &str, max: usize) -> Result<(), K8sError> {
    let bad = |why: String| K8sError::Name {
        what,
        name: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > max {
        return Err(bad(format!("1 to {max} characters")));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("only lowercase letters, digits and `-`".into()));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("must start and end with a letter or digit".into()));
    }
    Ok(())
}

/// A DNS-1123 name made from free text (a recipe's name): lowercase, other characters as `-`, trimmed to
/// `max` characters.
pub fn sanitize_name(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out: String = out.trim_matches('-').chars().take(max).collect();
    while out.ends_with('-') {
        out.pop();
    }
    if out.is_empty() {
        out.push_str("m3d");
    }
    out
}

/// A fresh job token: 32 random bytes, hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("job name", "clip-tiny", 40).is_ok());
        assert!(check_name("job name", "Clip", 40).is_err());
        assert!(check_name("job name", "-a", 40).is_err());
        assert!(check_name("job name", &"a".repeat(41), 40).is_err());
        assert_eq!(sanitize_name("M3D CLIP_tiny!", 40), "m3d-clip-tiny");
        assert_eq!(sanitize_name("___", 40), "m3d");
        assert_eq!(sanitize_name("abc-def", 4), "abc");
        assert_ne!(new_token(), new_token());
        assert_eq!(new_token().len(), 64);
    }
}
