//! One real PostgreSQL 15 per test binary, started on first use: `initdb` and `postgres` from
//! /usr/lib/postgresql/15/bin in a temp dir, on a free port, as `nobody` when running as root
//! (PostgreSQL refuses root). It dies with the test process (`setpriv --pdeathsig`).
//!
//! Roles: `postgres` (superuser, trust over the unix socket), `app_scram` (SCRAM password
//! `scram-pw`), `app_md5` (md5-stored password `md5-pw`), `app_clear` (`clear-pw`, asked in
//! clear text) and `app_trust` (no password).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Pg {
    pub port: u16,
    pub socket_dir: PathBuf,
    data: PathBuf,
    /// `-c` settings beyond the common ones (ssl).
    extra: Vec<String>,
}

static PG: OnceLock<Pg> = OnceLock::new();

pub fn pg() -> &'static Pg {
    PG.get_or_init(|| start(None))
}

/// Another PostgreSQL (not the shared one) with `ssl=on`, serving this PEM certificate and key.
pub fn start_with_ssl(cert_pem: &str, key_pem: &str) -> Pg {
    start(Some((cert_pem, key_pem)))
}

/// Another PostgreSQL of its own, for a test that stops or restarts the whole server.
pub fn start_private() -> Pg {
    start(None)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A command run as the unprivileged PostgreSQL user.
fn as_pg_user(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    if is_root() {
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"]);
    }
    c.arg("--pdeathsig=KILL").arg(program);
    c
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn start(ssl: Option<(&str, &str)>) -> Pg {
    let initdb = format!("{BIN}/initdb");
    assert!(
        std::path::Path::new(&initdb).exists(),
        "PostgreSQL 15 is not installed ({initdb} missing); install it with: sudo apt-get install postgresql"
    );
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!(
        "sidelight-pg-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let data = dir.join("data");
    std::fs::create_dir_all(&data).expect("temp dir");
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(ok.success(), "chown of {dir:?} failed");
    }
    let out = as_pg_user(&initdb)
        .args(["-D"])
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
        ])
        .stdout(Stdio::null())
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\n\
         host all app_trust 127.0.0.1/32 trust\n\
         host all app_md5 127.0.0.1/32 md5\n\
         host all app_clear 127.0.0.1/32 password\n\
         host all all 127.0.0.1/32 scram-sha-256\n",
    )
    .expect("pg_hba.conf");
    let mut ssl_args = Vec::new();
    if let Some((cert, key)) = ssl {
        use std::os::unix::fs::PermissionsExt;
        let (crt, k) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&crt, cert).expect("server.crt");
        std::fs::write(&k, key).expect("server.key");
        // PostgreSQL refuses a key file others can read.
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        if is_root() {
            let ok = Command::new("chown")
                .args(["nobody:nogroup"])
                .arg(&crt)
                .arg(&k)
                .status()
                .expect("chown");
            assert!(ok.success(), "chown of the server key failed");
        }
        ssl_args = vec!["-c".to_string(), "ssl=on".to_string()];
    }
    let pg = Pg {
        port: free_port(),
        socket_dir: dir,
        data,
        extra: ssl_args,
    };
    pg.launch();
    pg.psql(
        "postgres",
        "CREATE ROLE app_scram LOGIN PASSWORD 'scram-pw';
         SET password_encryption = 'md5';
         CREATE ROLE app_md5 LOGIN PASSWORD 'md5-pw';
         RESET password_encryption;
         CREATE ROLE app_clear LOGIN PASSWORD 'clear-pw';
         CREATE ROLE app_trust LOGIN;",
    );
    pg
}

/// Data dirs of earlier test processes that are gone (their postgres died with them).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("sidelight-pg-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Pg {
    /// Starts postgres on this data dir and port and waits until it accepts connections.
    fn launch(&self) {
        let postgres = format!("{BIN}/postgres");
        let mut args: Vec<String> = vec![
            "-D".into(),
            self.data.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-c".into(),
            "listen_addresses=127.0.0.1".into(),
            "-c".into(),
            format!("unix_socket_directories={}", self.socket_dir.display()),
        ];
        for setting in ["fsync=off", "max_connections=200", "log_min_messages=fatal"] {
            args.extend(["-c".to_string(), setting.to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        // The thread that starts postgres lives as long as the process, so the death signal
        // only comes when the test binary exits.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let child = as_pg_user(&postgres)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let _ = tx.send(child.map(|_| ()).map_err(|e| e.to_string()));
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("postgres thread").expect("spawn postgres");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.is_ready() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn is_ready(&self) -> bool {
        Command::new(format!("{BIN}/pg_isready"))
            .args(["-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Stops the whole server as an operator would (`pg_ctl stop -m fast`: every backend is
    /// terminated with 57P01); returns once the postmaster is gone.
    pub fn stop(&self) {
        let out = as_pg_user(&format!("{BIN}/pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "30", "stop"])
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the stopped server again, same data and port.
    pub fn start_again(&self) {
        self.launch();
    }

    /// Runs SQL as the superuser over the unix socket; panics with psql's output on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(format!("{BIN}/psql"))
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A fresh database owned by `owner`, for a test that needs its own tables.
    pub fn create_db(&self, name: &str, owner: &str) {
        self.psql("postgres", &format!("DROP DATABASE IF EXISTS {name}"));
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {owner}"));
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
