//! A deliberately minimal, blocking QMP client for the tests that start real QEMU:
//! enough to negotiate and query a test VM. The engine's own client lives in the
//! library.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

pub struct TestQmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl TestQmp {
    /// Connects to QEMU's QMP socket (waiting for it while `child` runs) and negotiates.
    pub fn connect(child: &mut Child, socket: &Path, timeout: Duration) -> Result<Self, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("QEMU exited with {status}"));
            }
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(format!("QMP socket never came up: {e}")),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        qmp.next_with("QMP")?;
        qmp.execute("qmp_capabilities")?;
        Ok(qmp)
    }

    /// Runs a command without arguments and returns its `return` value.
    pub fn execute(&mut self, command: &str) -> Result<serde_json::Value, String> {
        self.writer
            .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(self.next_with("return")?["return"].take())
    }

    /// The next message that has `key`, skipping events; QMP errors fail.
    fn next_with(&mut self, key: &str) -> Result<serde_json::Value, String> {
        loop {
            let mut line = String::new();
            if self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("QMP closed".into());
            }
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("bad QMP line {line:?}: {e}"))?;
            if let Some(error) = value.get("error") {
                return Err(format!("QMP error: {error}"));
            }
            if value.get(key).is_some() {
                return Ok(value);
            }
        }
    }
}
