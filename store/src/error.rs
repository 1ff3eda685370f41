//! The store's error type. Every variant names the store URL and the key (or local path) it was working on.

/// Errors of object-store access.
// Large sources are boxed so that `Result<_, StoreError>` stays small on the happy path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store URL could not be understood or the store could not be opened.
    #[error("store `{url}`: {reason}")]
    StoreOpen { url: String, reason: String },

    /// An object-store operation failed.
    #[error("store `{url}`: {op} `{key}`: {source}")]
    Store {
        url: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// A key that cannot name an object (empty, absolute, `..`, empty segments).
    #[error("invalid object key `{key}`: {reason}")]
    InvalidKey { key: String, reason: String },

    /// An S3 request failed while fetching credentials from the instance-metadata service, the fallback
    /// when the environment names none: say that they are missing, not only that the fallback failed.
    #[error(
        "store `{url}`: {op} `{key}`: no S3 credentials in the environment (AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY unset, no AWS_WEB_IDENTITY_TOKEN_FILE or container credentials), and the \
         instance-metadata fallback failed: {source}"
    )]
    NoCredentials {
        url: String,
        op: &'static str,
        key: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// The object does not exist.
    #[error("store `{url}`: object `{key}` not found")]
    NotFound { url: String, key: String },

    /// A local store folder that a reader needs does not exist (see `Store::open_existing`).
    #[error("{path} does not exist")]
    MissingFolder { path: String },

    /// Local filesystem error (creating or syncing a folder of a local store).
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A caller passed inconsistent arguments (a range past an object's end), or the store's runtime is gone.
    #[error("{0}")]
    Invalid(String),
}
