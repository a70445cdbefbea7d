//! The PostgreSQL server the tests use: the one `VERIGATE_TEST_POSTGRES_URL` names (CI
//! starts it), or one started here by tests/support/postgres.sh. Each test gets a
//! database of its own.

use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::helpers::skip_or_fail;

static SERVER: OnceLock<Result<String, String>> = OnceLock::new();

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/postgres.sh");

/// Runs the server script for `dir` and `port`; its output (the URL).
fn script(args: &[&str], env: &[(&str, String)]) -> Result<String, String> {
    let out = std::process::Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .map_err(|e| format!("cannot run {SCRIPT}: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A PostgreSQL server of one test's own, for faults (stopping it) that would break
/// the tests sharing the common one. Stopped and deleted on drop.
pub struct OwnServer {
    pub url: String,
    env: Vec<(&'static str, String)>,
    dir: std::path::PathBuf,
}

impl OwnServer {
    pub fn start(name: &str) -> Self {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/test-postgres-own")
            .join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let env = vec![
            ("VERIGATE_PG_DIR", dir.display().to_string()),
            ("VERIGATE_PG_PORT", port.to_string()),
        ];
        let url = script(&[], &env).expect("a PostgreSQL server of its own starts");
        Self { url, env, dir }
    }

    pub fn stop(&self) {
        script(&["stop"], &self.env).expect("PostgreSQL stops");
    }

    pub fn start_again(&self) {
        script(&[], &self.env).expect("PostgreSQL starts again");
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = script(&["stop"], &self.env);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The server's URL (its `postgres` database), starting the server if need be.
pub fn server() -> Result<&'static str, &'static str> {
    SERVER
        .get_or_init(|| {
            if let Ok(url) = std::env::var("VERIGATE_TEST_POSTGRES_URL") {
                return Ok(url);
            }
            script(&[], &[])
        })
        .as_deref()
        .map_err(String::as_str)
}

/// Whether the tests can use PostgreSQL; a missing server fails the test unless
/// `VERIGATE_SKIP_POSTGRES_TESTS=1` asks to skip it (never under CI=true).
pub fn available() -> bool {
    match server() {
        Ok(_) => true,
        Err(why) => {
            skip_or_fail(
                &format!("PostgreSQL is needed and could not be started: {why}"),
                "VERIGATE_SKIP_POSTGRES_TESTS",
            );
            false
        }
    }
}

/// Databases of test runs that have ended are dropped once per test process: each run
/// makes dozens, and a server kept between runs would otherwise fill the disk.
static SWEPT: OnceLock<()> = OnceLock::new();

/// The test process that made database `name`, if it is one of ours: `verigate_t<pid>_…`.
/// Those named `verigate_` and 16 hex digits come from before the names said so.
fn maker_of(name: &str) -> Option<Option<u32>> {
    if let Some(rest) = name.strip_prefix("verigate_t") {
        let (pid, _) = rest.split_once('_')?;
        return pid.parse().ok().map(Some);
    }
    let hash = name.strip_prefix("verigate_")?;
    (hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(None)
}

/// Drops the databases of test processes that are no longer running (Linux tells by
/// /proc; elsewhere nothing is dropped).
async fn sweep(client: &tokio_postgres::Client) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let rows = client
        .query("SELECT datname FROM pg_database", &[])
        .await
        .unwrap();
    for row in rows {
        let name: String = row.get(0);
        let ended = match maker_of(&name) {
            Some(Some(pid)) => !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            Some(None) => true,
            None => false,
        };
        if ended {
            // Another sweeping process may have dropped it first.
            let _ = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// Set for a process a test spawns to work on the test's databases: the test's pid.
pub const OWNER: &str = "VERIGATE_TEST_DATABASE_OWNER";

/// The URL of a database of its own for `name`, created (empty) the first time. It is
/// named for the test process that owns it, so that later runs know when it is done.
pub fn database(name: &str) -> String {
    let server = server().expect("PostgreSQL is available");
    let owner = std::env::var(OWNER).unwrap_or_else(|_| std::process::id().to_string());
    let db = format!(
        "verigate_t{owner}_{}",
        Sha256::digest(name.as_bytes())
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let admin = server.to_owned();
    let create = db.clone();
    // Its own runtime on its own thread: callers may be inside a runtime or not.
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .expect("connect to the test PostgreSQL server");
            tokio::spawn(connection);
            if SWEPT.set(()).is_ok() {
                sweep(&client).await;
            }
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&create])
                .await
                .unwrap()
                .is_some();
            if !exists {
                // Two tests may race to create it; the loser finds it made.
                let _ = client
                    .batch_execute(&format!("CREATE DATABASE {create}"))
                    .await;
            }
        });
    })
    .join()
    .unwrap();
    match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("a server URL without a database: {server}"),
    }
}
