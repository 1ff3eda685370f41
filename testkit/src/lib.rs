//! Test support shared by every crate's tests (a dev-dependency only): where the Python oracle interpreter is,
//! a real S3-protocol server (moto, from the same venv) on loopback, killed when the test ends, and a TCP proxy
//! that a test can cut to make a server unreachable mid-request without losing its state.
//!
//! Everything here panics with a clear message instead of returning errors: it only runs inside tests, and an
//! oracle test must never pass without its oracle.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The folder of the package whose test is running: `CARGO_MANIFEST_DIR` as cargo and nextest set it when they
/// run a test. Read at run time, not baked in at compile time: a build reused from a clone in another folder
/// (same relative paths, older sources) would otherwise point into that folder.
pub fn package_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf())
}

/// The workspace root: the nearest folder at or above [`package_dir`] holding `Cargo.lock`.
pub fn workspace_root() -> PathBuf {
    let start = package_dir();
    start
        .ancestors()
        .find(|d| d.join("Cargo.lock").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| start.join(".."))
}

/// The Python oracle interpreter: `M3D_PYTHON`, or else `<workspace>/.venv/bin/python` (made by scripts/setup.sh).
pub fn python() -> PathBuf {
    let p = std::env::var_os("M3D_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".venv/bin/python"));
    assert!(
        p.exists(),
        "Python oracle interpreter {} not found: run scripts/setup.sh (or set M3D_PYTHON)",
        p.display()
    );
    p
}

/// Runs `python script args...`, requiring success; returns stdout.
pub fn run_python(script: &Path, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn python {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "oracle {} {args:?} failed\nstdout: {}\nstderr: {}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

/// A moto S3 server on 127.0.0.1, killed on drop.
pub struct S3Server {
    child: Child,
    pub port: u16,
}

impl S3Server {
    /// Starts `python -m moto.server` on a free loopback port, logging to `log`, and waits until it listens.
    pub fn start(log: &Path) -> S3Server {
        S3Server::start_on(log, "127.0.0.1")
    }

    /// [`S3Server::start`] listening on `host` (`0.0.0.0`: also reachable from containers, through their
    /// network's gateway).
    pub fn start_on(log: &Path, host: &str) -> S3Server {
        let python = python();
        let probe = Command::new(&python)
            .args(["-c", "import moto.server"])
            .output()
            .expect("spawn python");
        assert!(
            probe.status.success(),
            "moto is not installed in {}: run scripts/setup.sh ({})",
            python.display(),
            String::from_utf8_lossy(&probe.stderr)
        );
        let port = free_port();
        let log_file = std::fs::File::create(log).expect("create moto log");
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", host, "-p", &port.to_string()])
            .stdout(Stdio::from(log_file.try_clone().expect("clone log handle")))
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn moto");
        let mut server = S3Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "moto server exited with {status}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto did not listen on port {port} within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `http://127.0.0.1:<port>`, the value for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends one plain HTTP request to moto (which checks no signatures on these) and returns the response.
    fn plain_request(&self, method: &str, target: &str) -> String {
        self.plain_request_with(method, target, b"")
    }

    /// [`S3Server::plain_request`] with a body.
    fn plain_request_with(&self, method: &str, target: &str, body: &[u8]) -> String {
        let port = self.port;
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to moto");
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("set timeout");
        write!(
            s,
            "{method} {target} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .and_then(|()| s.write_all(body))
        .expect("send a request to moto");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read moto's response");
        assert!(
            resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
            "{method} {target}: {resp}"
        );
        resp
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        self.plain_request("PUT", &format!("/{bucket}"));
    }

    /// Writes object `key` of `bucket`, independent of the code under test (e.g. another job's data).
    pub fn put_object(&self, bucket: &str, key: &str, body: &[u8]) {
        self.plain_request_with("PUT", &format!("/{bucket}/{key}"), body);
    }

    /// The keys under `prefix` in `bucket`, sorted, as any S3 client would list them, independent of the
    /// code under test.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let resp = self.plain_request(
            "GET",
            &format!("/{bucket}?list-type=2&max-keys=1000&prefix={prefix}"),
        );
        let mut keys: Vec<String> = resp
            .split("<Key>")
            .skip(1)
            .filter_map(|k| k.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect();
        keys.sort();
        keys
    }

    /// Kills the server now (e.g. to test behaviour when the store disappears).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy on loopback in front of `target`: [`TcpProxy::cut`] closes every open connection and refuses
/// new ones (to the client the server is gone), [`TcpProxy::restore`] lets them through again — while the
/// server behind it keeps its state for the test to inspect.
pub struct TcpProxy {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl TcpProxy {
    /// Starts the proxy to `target` (`host:port`).
    pub fn start(target: &str) -> TcpProxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = std::sync::Arc::new(std::sync::Mutex::new(Vec::<TcpStream>::new()));
        let target = target.to_string();
        let (c, o) = (cut.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let pipes = [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ];
                if let Ok(mut list) = o.lock() {
                    list.extend([client, server]);
                }
                for pipe in pipes {
                    if let (Ok(mut from), Ok(mut to)) = pipe {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Write);
                        });
                    }
                }
            }
        });
        TcpProxy { addr, cut, open }
    }

    /// `http://127.0.0.1:<port>` of the proxy.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes every connection through the proxy and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self.open.lock().expect("proxy connections").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
