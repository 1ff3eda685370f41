//! Object storage for everything m3d keeps (shards, indexes, manifests, checkpoints, job state, run outputs):
//! URL parsing (local path, `file://`, `s3://`), a synchronous API backed by one internal tokio runtime per
//! [`Store`], `_async` variants for callers that already run async code, ranged reads, conditional puts and an
//! optional log of reads ([`IoLog`]) that tests and benchmarks count requests and bytes with.
//!
//! Keys are `/`-separated paths relative to the store root (`manifest.json`, `volumes/part-00000.parquet`).
//! Opening a location to read it ([`Store::open_existing`]) never creates folders; [`Store::open`] (for
//! writers) creates a local root.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, PutPayload, WriteMultipart};

pub use error::StoreError;

mod error;

/// Objects larger than this are uploaded to S3 in parts, so a failed request only retries one part and
/// the object only becomes visible when the upload completes.
pub const MULTIPART_THRESHOLD: usize = 32 * 1024 * 1024;
/// Part size for multipart uploads (S3 requires at least 5 MiB per part except the last).
pub const MULTIPART_PART_SIZE: usize = 16 * 1024 * 1024;
/// Parts in flight at once during a multipart upload.
const MULTIPART_CONCURRENCY: usize = 4;

/// Which backend a [`Store`] talks to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// A folder on the local filesystem (absolute, canonical path).
    Local(std::path::PathBuf),
    /// An S3 bucket and a key prefix inside it (may be empty).
    S3 { bucket: String, prefix: String },
}

/// Owns the runtime; shuts it down without blocking so that dropping the last `Store` clone inside an
/// async context does not panic (tokio refuses a blocking runtime drop there).
struct RuntimeHolder(Option<tokio::runtime::Runtime>);

impl Drop for RuntimeHolder {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl RuntimeHolder {
    fn handle(&self) -> Option<&tokio::runtime::Runtime> {
        self.0.as_ref()
    }
}

/// An object-store location.
///
/// URL forms: a plain path (relative or absolute, created if missing), `file:///abs/path`, and
/// `s3://bucket/prefix`. For S3, credentials, region and endpoint come from the standard environment
/// variables `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
/// `AWS_DEFAULT_REGION` (default `us-east-1`) and `AWS_ENDPOINT_URL` (requests are then path-style, and
/// plain `http://` endpoints are allowed). Other `AWS_*` settings understood by `object_store` (web
/// identity, container credentials) are honoured too.
///
/// The API is synchronous so that rayon-parallel converters can call it from any thread: each call runs
/// on an internal multi-threaded tokio runtime created once per `Store` (clones share it) and the
/// calling thread waits for the result. This also works from inside another runtime, though there the
/// `_async` variants are preferable because they do not block a worker thread.
///
/// `Debug` shows only the URL and backend, never credentials.
#[derive(Clone)]
pub struct Store {
    url: String,
    kind: StoreKind,
    inner: Arc<dyn ObjectStore>,
    rt: Arc<RuntimeHolder>,
    /// Records every read when set ([`Store::with_io_log`]).
    io: Option<Arc<IoLog>>,
}

/// One read request a [`Store`] made ([`Store::with_io_log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoEvent {
    /// `get`, `get_range`, `head` or `list`.
    pub op: &'static str,
    /// The key (or listed prefix).
    pub key: String,
    /// Bytes received.
    pub bytes: u64,
}

/// The reads of a [`Store`] and its clones, in order: what a test or a benchmark counts to show which objects
/// a code path touches and how many bytes it pulls.
#[derive(Debug, Default)]
pub struct IoLog {
    events: std::sync::Mutex<Vec<IoEvent>>,
}

impl IoLog {
    fn push(&self, op: &'static str, key: &str, bytes: u64) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(IoEvent {
                op,
                key: key.to_string(),
                bytes,
            });
    }

    /// Every read so far.
    pub fn events(&self) -> Vec<IoEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forgets the reads so far.
    pub fn clear(&self) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Requests and bytes of the reads whose key starts with `prefix`.
    pub fn totals(&self, prefix: &str) -> (usize, u64) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|e| e.key.starts_with(prefix))
            .fold((0, 0), |(n, b), e| (n + 1, b + e.bytes))
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("url", &self.url)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Checks and converts a store-relative key. Keys must be relative `/`-separated paths without empty,
/// `.` or `..` segments, so that a key can never escape the store root.
fn object_path(key: &str) -> Result<ObjectPath, StoreError> {
    let invalid = |reason: &str| StoreError::InvalidKey {
        key: key.to_string(),
        reason: reason.to_string(),
    };
    if key.is_empty() {
        return Err(invalid("empty key"));
    }
    if key.starts_with('/') {
        return Err(invalid("keys are relative to the store root"));
    }
    if key
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(invalid("empty, `.` or `..` path segment"));
    }
    ObjectPath::parse(key).map_err(|e| invalid(&e.to_string()))
}

/// Like [`object_path`] but an empty prefix (or one made only of slashes) means "everything".
fn prefix_path(prefix: &str) -> Result<Option<ObjectPath>, StoreError> {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        Ok(None)
    } else {
        object_path(trimmed).map(Some)
    }
}

/// Whether the environment names S3 credentials in a way `object_store` reads before falling back to the
/// instance-metadata service: static keys, a web identity token (EKS/IRSA) or container credentials (ECS).
fn credentials_in_env() -> bool {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    (set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY"))
        || set("AWS_WEB_IDENTITY_TOKEN_FILE")
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || set("AWS_CONTAINER_CREDENTIALS_FULL_URI")
}

/// Whether `e` came from asking the instance-metadata service (IMDS) for credentials: its requests go to
/// `/latest/api/token` and `/latest/meta-data/iam/` on `AWS_METADATA_ENDPOINT` (default 169.254.169.254).
fn from_metadata_service(e: &object_store::Error) -> bool {
    let text = e.to_string();
    text.contains("/latest/api/token") || text.contains("/latest/meta-data/")
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl Store {
    /// Opens a store at `url` (see the type documentation for the accepted forms). Requests to S3 are
    /// retried as `object_store` does by default (up to 10 times within 3 minutes).
    pub fn open(url: &str) -> Result<Store, StoreError> {
        Self::open_with(url, None)
    }

    /// [`Store::open`] for reading what must already be there: a local folder that does not exist is an error
    /// naming it, rather than an empty folder created on the way in which every object is "not found".
    pub fn open_existing(url: &str) -> Result<Store, StoreError> {
        let local = if url.starts_with("file://") {
            url::Url::parse(url)
                .ok()
                .and_then(|u| u.to_file_path().ok())
        } else if url.contains("://") || url.is_empty() {
            None
        } else {
            Some(std::path::PathBuf::from(url))
        };
        if let Some(path) = local.filter(|p| !p.is_dir()) {
            return Err(StoreError::MissingFolder {
                path: path.display().to_string(),
            });
        }
        Self::open(url)
    }

    /// [`Store::open`] with a bound on each request's retries (`max_retries`, all within `timeout`), for a
    /// caller that retries whole operations itself and must fail in bounded time (checkpoint uploads).
    pub fn open_with_retries(
        url: &str,
        max_retries: usize,
        timeout: std::time::Duration,
    ) -> Result<Store, StoreError> {
        Self::open_with(
            url,
            Some(object_store::RetryConfig {
                max_retries,
                retry_timeout: timeout,
                ..Default::default()
            }),
        )
    }

    fn open_with(url: &str, retry: Option<object_store::RetryConfig>) -> Result<Store, StoreError> {
        let open_err = |reason: String| StoreError::StoreOpen {
            url: url.to_string(),
            reason,
        };
        let (kind, inner): (StoreKind, Arc<dyn ObjectStore>) = if let Some(rest) =
            url.strip_prefix("s3://")
        {
            let (bucket, prefix) = match rest.split_once('/') {
                Some((b, p)) => (b, p.trim_matches('/')),
                None => (rest, ""),
            };
            if bucket.is_empty() {
                return Err(open_err("missing bucket name in s3:// URL".into()));
            }
            let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
            if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err()
            {
                builder = builder.with_region("us-east-1");
            }
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                let endpoint = endpoint.trim_end_matches('/').to_string();
                // Custom endpoints (MinIO, Ceph, moto, ...) generally need path-style requests.
                builder = builder
                    .with_allow_http(endpoint.starts_with("http://"))
                    .with_virtual_hosted_style_request(false)
                    .with_endpoint(endpoint);
            }
            if let Some(retry) = retry {
                builder = builder.with_retry(retry);
            }
            let s3 = builder
                .build()
                .map_err(|e| open_err(format!("cannot configure S3 client: {e}")))?;
            let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
                Arc::new(s3)
            } else {
                let p = object_path(prefix).map_err(|e| open_err(e.to_string()))?;
                Arc::new(PrefixStore::new(s3, p))
            };
            (
                StoreKind::S3 {
                    bucket: bucket.to_string(),
                    prefix: prefix.to_string(),
                },
                inner,
            )
        } else if url.starts_with("file://") {
            let parsed =
                url::Url::parse(url).map_err(|e| open_err(format!("invalid file URL: {e}")))?;
            let path = parsed
                .to_file_path()
                .map_err(|()| open_err("file:// URL must name an absolute local path".into()))?;
            Self::local(url, &path)?
        } else if url.contains("://") {
            return Err(open_err(
                "unsupported URL scheme (expected a local path, file:// or s3://)".into(),
            ));
        } else if url.is_empty() {
            return Err(open_err("empty store URL".into()));
        } else {
            Self::local(url, std::path::Path::new(url))?
        };
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(2, 8);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("m3d-store")
            .enable_all()
            .build()
            .map_err(|e| open_err(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Store {
            url: url.to_string(),
            kind,
            inner,
            rt: Arc::new(RuntimeHolder(Some(rt))),
            io: None,
        })
    }

    /// This store (and its later clones) recording every read in the returned log.
    pub fn with_io_log(mut self) -> (Store, Arc<IoLog>) {
        let log = Arc::new(IoLog::default());
        self.io = Some(Arc::clone(&log));
        (self, log)
    }

    fn record(&self, op: &'static str, key: &str, bytes: u64) {
        if let Some(io) = &self.io {
            io.push(op, key, bytes);
        }
    }

    fn local(
        url: &str,
        path: &std::path::Path,
    ) -> Result<(StoreKind, Arc<dyn ObjectStore>), StoreError> {
        std::fs::create_dir_all(path).map_err(|source| StoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let canonical = std::fs::canonicalize(path).map_err(|source| StoreError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let fs =
            LocalFileSystem::new_with_prefix(&canonical).map_err(|e| StoreError::StoreOpen {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        Ok((StoreKind::Local(canonical), Arc::new(fs)))
    }

    /// The URL this store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The backend and its resolved location.
    pub fn kind(&self) -> &StoreKind {
        &self.kind
    }

    /// The file that holds `key` when this store is a local folder (for readers that stream a file into
    /// memory they own rather than take a buffer); `None` for other backends or an invalid key.
    pub fn local_path(&self, key: &str) -> Option<std::path::PathBuf> {
        match &self.kind {
            StoreKind::Local(root) => object_path(key).ok().map(|_| root.join(key)),
            StoreKind::S3 { .. } => None,
        }
    }

    /// Makes the object at `key` durable: on a local folder its file is flushed to disk (`fsync`), which a
    /// put alone does not do; S3 objects are durable once written, so there this does nothing.
    pub fn sync(&self, key: &str) -> Result<(), StoreError> {
        let Some(path) = self.local_path(key) else {
            return Ok(());
        };
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|source| StoreError::Io {
                path: path.display().to_string(),
                source,
            })
    }

    fn store_err(&self, op: &'static str, key: &str, source: object_store::Error) -> StoreError {
        if is_not_found(&source) {
            StoreError::NotFound {
                url: self.url.clone(),
                key: key.to_string(),
            }
        } else if matches!(self.kind, StoreKind::S3 { .. })
            && !credentials_in_env()
            && from_metadata_service(&source)
        {
            StoreError::NoCredentials {
                url: self.url.clone(),
                op,
                key: key.to_string(),
                source: Box::new(source),
            }
        } else {
            StoreError::Store {
                url: self.url.clone(),
                op,
                key: key.to_string(),
                source: Box::new(source),
            }
        }
    }

    /// Runs `fut` on the store's runtime and waits for it. Spawning (rather than `Runtime::block_on`)
    /// keeps this usable from threads that are themselves inside a tokio runtime.
    fn run<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    {
        let rt = self
            .rt
            .handle()
            .ok_or_else(|| StoreError::Invalid("store runtime already shut down".into()))?;
        let handle = rt.spawn(fut);
        match futures::executor::block_on(handle) {
            Ok(r) => r,
            Err(e) => Err(StoreError::Invalid(format!(
                "store `{}`: I/O task failed: {e}",
                self.url
            ))),
        }
    }

    /// Writes `bytes` at `key`, replacing any existing object. Readers never see a partial object:
    /// the local backend writes a temporary file and renames it; S3 objects appear when the (multipart,
    /// above [`MULTIPART_THRESHOLD`]) upload completes.
    pub fn put(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.put_parts(key, vec![bytes])
    }

    /// [`Store::put`] of an object given as consecutive buffers (a file header and the tensors after it),
    /// written in order without joining them first.
    pub fn put_parts(&self, key: &str, parts: Vec<Bytes>) -> Result<(), StoreError> {
        let this = self.clone();
        let key = key.to_string();
        self.run(async move { this.put_parts_async(&key, parts).await })
    }

    /// Async variant of [`Store::put`].
    pub async fn put_async(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.put_parts_async(key, vec![bytes]).await
    }

    /// Async variant of [`Store::put_parts`].
    pub async fn put_parts_async(&self, key: &str, parts: Vec<Bytes>) -> Result<(), StoreError> {
        let path = object_path(key)?;
        let len: usize = parts.iter().map(Bytes::len).sum();
        let multipart = matches!(self.kind, StoreKind::S3 { .. }) && len > MULTIPART_THRESHOLD;
        if multipart {
            let upload = self
                .inner
                .put_multipart(&path)
                .await
                .map_err(|e| self.store_err("put", key, e))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_SIZE);
            for part in parts {
                let mut rest = part;
                while !rest.is_empty() {
                    if let Err(e) = writer.wait_for_capacity(MULTIPART_CONCURRENCY).await {
                        // Best effort: the upload failed already, so an abort error adds nothing.
                        let _ = writer.abort().await;
                        return Err(self.store_err("put", key, e));
                    }
                    let n = rest.len().min(MULTIPART_PART_SIZE);
                    writer.put(rest.split_to(n));
                }
            }
            writer
                .finish()
                .await
                .map_err(|e| self.store_err("put", key, e))?;
        } else {
            self.inner
                .put(&path, PutPayload::from_iter(parts))
                .await
                .map_err(|e| self.store_err("put", key, e))?;
        }
        tracing::debug!(store = %self.url, key, multipart, "put");
        Ok(())
    }

    /// Writes `bytes` at `key` only if no object is there: a conditional put (`If-None-Match: *` on S3, an
    /// exclusive create on a local folder), so that of two writers racing for a key exactly one wins.
    /// Returns `false`, writing nothing, if the key exists. A store without conditional puts gets a plain
    /// put after a check, which narrows the race without closing it.
    pub fn put_if_absent(&self, key: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let path = object_path(key)?;
        let this = self.clone();
        let key = key.to_string();
        self.run(async move {
            let opts = object_store::PutOptions::from(object_store::PutMode::Create);
            match this
                .inner
                .put_opts(&path, PutPayload::from_bytes(bytes.clone()), opts)
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(object_store::Error::NotImplemented) => {
                    if this.get_opt_async(&key).await?.is_some() {
                        return Ok(false);
                    }
                    this.put_async(&key, bytes).await.map(|()| true)
                }
                Err(e) => Err(this.store_err("put", &key, e)),
            }
        })
    }

    /// Reads the whole object at `key`; a missing object is [`StoreError::NotFound`].
    pub fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let this = self.clone();
        let key = key.to_string();
        self.run(async move { this.get_async(&key).await })
    }

    /// Async variant of [`Store::get`].
    pub async fn get_async(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = object_path(key)?;
        let result = self
            .inner
            .get(&path)
            .await
            .map_err(|e| self.store_err("get", key, e))?;
        let bytes = result
            .bytes()
            .await
            .map_err(|e| self.store_err("get", key, e))?;
        self.record("get", key, bytes.len() as u64);
        Ok(bytes)
    }

    /// Reads bytes `range` of the object at `key` (one ranged request); a missing object is
    /// [`StoreError::NotFound`], a range past its end an error.
    pub fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes, StoreError> {
        // A local folder is read on the calling thread: the hop through the I/O runtime (a task, a blocking-pool
        // thread and two wake-ups) cost more than reading a volume from a warm page cache, and far more while
        // the cores are busy (a volume reader waited milliseconds per volume for the runtime's threads).
        if let Some(path) = self.local_path(key) {
            return self.get_range_local(key, &path, range);
        }
        let this = self.clone();
        let key = key.to_string();
        self.run(async move { this.get_range_async(&key, range).await })
    }

    fn get_range_local(
        &self,
        key: &str,
        path: &std::path::Path,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let want = range.end.saturating_sub(range.start);
        let io_err = |source| StoreError::Io {
            path: path.display().to_string(),
            source,
        };
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    url: self.url.clone(),
                    key: key.to_string(),
                })
            }
            Err(e) => return Err(io_err(e)),
        };
        file.seek(SeekFrom::Start(range.start)).map_err(io_err)?;
        let mut buf = Vec::with_capacity(usize::try_from(want).unwrap_or(0));
        file.take(want).read_to_end(&mut buf).map_err(io_err)?;
        self.record("get_range", key, buf.len() as u64);
        if buf.len() as u64 != want {
            return Err(StoreError::Invalid(format!(
                "`{key}` in `{}`: asked for {want} bytes, got {}",
                self.url,
                buf.len()
            )));
        }
        Ok(Bytes::from(buf))
    }

    /// Async variant of [`Store::get_range`].
    pub async fn get_range_async(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let path = object_path(key)?;
        let want = range.end.saturating_sub(range.start);
        let bytes = self
            .inner
            .get_range(&path, range)
            .await
            .map_err(|e| self.store_err("get_range", key, e))?;
        self.record("get_range", key, bytes.len() as u64);
        if bytes.len() as u64 != want {
            return Err(StoreError::Invalid(format!(
                "`{key}` in `{}`: asked for {want} bytes, got {}",
                self.url,
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Reads the object at `key`, or `None` if it does not exist.
    pub fn get_opt(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let this = self.clone();
        let key = key.to_string();
        self.run(async move { this.get_opt_async(&key).await })
    }

    /// Async variant of [`Store::get_opt`].
    pub async fn get_opt_async(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self.get_async(key).await {
            Ok(b) => Ok(Some(b)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Size in bytes of the object at `key`, or `None` if it does not exist.
    pub fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = object_path(key)?;
        let this = self.clone();
        let key = key.to_string();
        self.run(async move {
            this.record("head", &key, 0);
            match this.inner.head(&path).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(this.store_err("head", &key, e)),
            }
        })
    }

    /// Lists objects under the folder-like `prefix` (whole path segments: `volumes` matches
    /// `volumes/part-00000.parquet`, `vol` does not); an empty prefix lists everything. Keys are relative
    /// to the store root, sorted. Temporary files of in-progress local writes are not listed.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let p = prefix_path(prefix)?;
        let this = self.clone();
        let prefix = prefix.to_string();
        self.run(async move {
            this.record("list", &prefix, 0);
            let listed: Result<Vec<_>, _> = this.inner.list(p.as_ref()).try_collect().await;
            let metas = match listed {
                Ok(m) => m,
                Err(e) if is_not_found(&e) => Vec::new(),
                Err(e) => return Err(this.store_err("list", &prefix, e)),
            };
            let mut out: Vec<(String, u64)> = metas
                .into_iter()
                .map(|m| (m.location.to_string(), m.size))
                .collect();
            out.sort();
            Ok(out)
        })
    }

    /// Deletes the object at `key`; deleting a missing object is not an error (as on S3).
    pub fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = object_path(key)?;
        let this = self.clone();
        let key = key.to_string();
        self.run(async move {
            match this.inner.delete(&path).await {
                Ok(()) => Ok(()),
                Err(e) if is_not_found(&e) => Ok(()),
                Err(e) => Err(this.store_err("delete", &key, e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_root() {
        for bad in ["", "/abs", "a/../b", "a//b", "./a", ".."] {
            assert!(object_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(object_path("volumes/part-00000.parquet").is_ok());
    }

    #[test]
    fn local_ranged_reads_are_exact_and_name_missing_objects_and_short_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let (store, log) = Store::open(dir.path().to_str().unwrap())
            .unwrap()
            .with_io_log();
        store
            .put("v/s.parquet", Bytes::from_static(b"0123456789"))
            .unwrap();
        assert_eq!(
            store.get_range("v/s.parquet", 2..6).unwrap(),
            Bytes::from_static(b"2345")
        );
        assert_eq!(store.get_range("v/s.parquet", 4..4).unwrap().len(), 0);
        let err = store
            .get_range("v/s.parquet", 8..12)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("v/s.parquet") && err.contains("asked for 4 bytes, got 2"),
            "{err}"
        );
        assert!(matches!(
            store.get_range("v/missing.parquet", 0..1),
            Err(StoreError::NotFound { key, .. }) if key == "v/missing.parquet"
        ));
        assert!(matches!(
            store.get_range("../escape", 0..1),
            Err(StoreError::InvalidKey { .. })
        ));
        // Each ranged read is logged with the bytes it returned, as for the other backends.
        let events = log.events();
        assert_eq!(events[0].op, "get_range");
        assert_eq!(
            (events[0].key.as_str(), events[0].bytes),
            ("v/s.parquet", 4)
        );
    }

    #[test]
    fn local_store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new/nested");
        let store = Store::open(root.to_str().unwrap()).unwrap();
        assert!(root.is_dir(), "local root is created");
        assert_eq!(store.get_opt("a/b.bin").unwrap(), None);
        assert_eq!(store.size("a/b.bin").unwrap(), None);
        assert!(matches!(
            store.get("a/b.bin"),
            Err(StoreError::NotFound { .. })
        ));
        store.put("a/b.bin", Bytes::from_static(b"hello")).unwrap();
        store.put("a/c.bin", Bytes::from_static(b"xy")).unwrap();
        store.put("top.json", Bytes::from_static(b"{}")).unwrap();
        assert_eq!(store.get("a/b.bin").unwrap(), Bytes::from_static(b"hello"));
        assert_eq!(store.size("a/c.bin").unwrap(), Some(2));
        assert_eq!(
            store.list("a").unwrap(),
            vec![("a/b.bin".to_string(), 5), ("a/c.bin".to_string(), 2)]
        );
        assert_eq!(store.list("").unwrap().len(), 3);
        assert_eq!(store.list("missing/").unwrap(), vec![]);
        assert!(!store
            .put_if_absent("a/c.bin", Bytes::from_static(b"zz"))
            .unwrap());
        assert_eq!(store.get("a/c.bin").unwrap(), Bytes::from_static(b"xy"));
        assert!(store
            .put_if_absent("a/d.bin", Bytes::from_static(b"zz"))
            .unwrap());
        store.delete("a/d.bin").unwrap();
        store
            .put_parts(
                "a/e.bin",
                vec![Bytes::from_static(b"he"), Bytes::from_static(b"llo")],
            )
            .unwrap();
        assert_eq!(store.get("a/e.bin").unwrap(), Bytes::from_static(b"hello"));
        store.delete("a/e.bin").unwrap();
        store.delete("a/b.bin").unwrap();
        store.delete("a/b.bin").unwrap();
        assert_eq!(store.get_opt("a/b.bin").unwrap(), None);

        let url = format!("file://{}", root.display());
        let same = Store::open(&url).unwrap();
        assert_eq!(same.get("a/c.bin").unwrap(), Bytes::from_static(b"xy"));
        assert!(Store::open("gs://bucket/x").is_err());
    }

    #[test]
    fn sync_api_works_inside_an_async_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().to_str().unwrap()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            store.put("k", Bytes::from_static(b"v")).unwrap();
            assert_eq!(
                store.get_async("k").await.unwrap(),
                Bytes::from_static(b"v")
            );
            // Dropping the last clone inside the runtime must not panic.
            drop(store);
        });
    }
}
