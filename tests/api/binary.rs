//! The `herald` binary as a separate process, with the fixture in a SQLite
//! file: what the process tests and the exhaustion tests start.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// The herald binary, running with the fixture in a SQLite file.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    /// Everything it wrote to stdout and stderr.
    pub output: Arc<Mutex<String>>,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Process {
    pub async fn start(env: &[(&str, &str)]) -> Process {
        Process::start_with(env, None).await
    }

    /// Starts it with these soft and hard limits on open files.
    pub async fn start_with_file_limit(env: &[(&str, &str)], soft: u64, hard: u64) -> Process {
        Process::start_with(env, Some((soft, hard))).await
    }

    pub async fn start_with(env: &[(&str, &str)], file_limit: Option<(u64, u64)>) -> Process {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("herald.db").display());
        // Creates the schema, then the fixture.
        let store = herald::store::SqlStore::connect(&url, 1, true).await.expect("the store opens");
        store.close().await;
        run_sql(&url, FIXTURE).await;
        let mut command = match file_limit {
            None => Command::new(env!("CARGO_BIN_EXE_herald")),
            Some((soft, hard)) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\""))
                    .arg(env!("CARGO_BIN_EXE_herald"));
                sh
            }
        };
        let mut child = command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HERALD_LISTEN", "127.0.0.1:0")
            .env("HERALD_DATABASE_URL", &url)
            .env("HERALD_JWT_SECRET", JWT_SECRET)
            .env("HERALD_PUBLISH_TOKEN", PUBLISH_TOKEN)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the herald binary starts");
        let output = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            let addr_tx = addr_tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Some(addr) = line.strip_prefix("herald listening on http://") {
                        let _ = addr_tx.send(addr.trim().to_owned());
                    }
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        let addr = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr.parse().expect("an address"),
            Err(_) => {
                let _ = child.kill();
                panic!("herald did not start:\n{}", output.lock().unwrap());
            }
        };
        Process { child, addr, output, http: reqwest::Client::new(), _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What it logged so far.
    pub fn logs(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub async fn publish_with(&self, token: &str, body: &Value) -> u16 {
        let response = self.http.post(self.url("/v1/events")).bearer_auth(token).json(body).send().await.unwrap();
        response.status().as_u16()
    }

    /// Resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// User plus system CPU time so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> =
            stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15; `fields` starts at field 3.
        (ticks(11) + ticks(12)) / 100.0
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
