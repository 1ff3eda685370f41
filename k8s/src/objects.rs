//! Rendered objects: typed values turned into YAML documents, and the one conversion between the core types
//! and the JobSet's generated ones.

use serde::{de::DeserializeOwned, Serialize};

use crate::K8sError;

/// One rendered Kubernetes object.
#[derive(Debug, Clone)]
pub struct Object {
    /// `ConfigMap`, `Secret`, `JobSet`, ...
    pub kind: String,
    pub name: String,
    /// The object as JSON (what the API server receives), from the typed struct.
    pub value: serde_json::Value,
}

impl Object {
    /// Serialises a typed object (its `apiVersion` and `kind` come from the type).
    pub fn of<T: Serialize>(object: &T) -> Result<Object, K8sError> {
        let value = serde_json::to_value(object).map_err(|source| K8sError::Serialise {
            what: std::any::type_name::<T>().to_string(),
            source,
        })?;
        let field = |k: &str| {
            value
                .pointer(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        Ok(Object {
            kind: field("/kind"),
            name: field("/metadata/name"),
            value,
        })
    }

    /// The object as one YAML document.
    pub fn to_yaml(&self) -> Result<String, K8sError> {
        serde_yaml::to_string(&self.value).map_err(|source| K8sError::Yaml {
            what: format!("{} {}", self.kind, self.name),
            source,
        })
    }

    /// The file name `m3d k8s render -o DIR` writes it to: numbered in apply order (secrets and config before
    /// the workloads that mount them).
    pub fn file_name(&self, position: usize) -> String {
        format!(
            "{position:02}-{}-{}.yaml",
            self.kind.to_ascii_lowercase(),
            self.name
        )
    }
}

/// All objects as one multi-document YAML stream (`kubectl apply -f -`).
pub fn to_yaml_documents(objects: &[Object]) -> Result<String, K8sError> {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&o.to_yaml()?);
    }
    Ok(out)
}

/// Moves a value between two typed descriptions of the same schema (`k8s-openapi`'s Job spec into the JobSet
/// CRD's generated copy of it) and refuses the result unless it serialises back to exactly the same JSON:
/// generated bindings ignore fields they do not know, and a dropped field (a probe, a failure rule) would be a
/// silently different job.
pub(crate) fn convert<T: Serialize, U: Serialize + DeserializeOwned>(
    what: &str,
    from: &T,
) -> Result<U, K8sError> {
    let ser = |source| K8sError::Serialise {
        what: what.to_string(),
        source,
    };
    let value = serde_json::to_value(from).map_err(ser)?;
    let to: U = serde_json::from_value(value.clone()).map_err(ser)?;
    let back = serde_json::to_value(&to).map_err(ser)?;
    if back != value {
        return Err(K8sError::Conversion {
            what: what.to_string(),
            detail: first_difference(&value, &back, String::new()),
        });
    }
    Ok(to)
}

/// The JSON path of the first place where `a` and `b` differ.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: String) -> String {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                match y.get(k) {
                    Some(w) if w == v => {}
                    Some(w) => return first_difference(v, w, format!("{path}.{k}")),
                    None => return format!("{path}.{k} is missing after the conversion"),
                }
            }
            for k in y.keys() {
                if !x.contains_key(k) {
                    return format!("{path}.{k} appeared in the conversion");
                }
            }
            format!("{path}: differs")
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                if v != w {
                    return first_difference(v, w, format!("{path}[{i}]"));
                }
            }
            format!("{path}: differs")
        }
        _ => format!("{path}: {a} became {b}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Wide {
        a: u32,
        b: u32,
    }
    #[derive(Debug, serde::Serialize, serde::Deserialize)]
    struct Narrow {
        a: u32,
    }

    #[test]
    fn a_conversion_that_drops_a_field_is_refused() {
        let w = Wide { a: 1, b: 2 };
        let e = convert::<Wide, Narrow>("test", &w).unwrap_err();
        assert!(e.to_string().contains(".b is missing"), "{e}");
        let n: Wide = convert("test", &w).unwrap();
        assert_eq!((n.a, n.b), (1, 2));
    }
}
