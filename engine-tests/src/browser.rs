//! A real headless browser for the web page's tests: Debian's `chromium` driven over
//! WebDriver (W3C, JSON over HTTP) by `chromedriver`, started per test on a free port
//! and killed with it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use std::io::{BufRead, BufReader, Read, Write};

use serde_json::{Value, json};

use crate::{free_port, wait_until};

/// A browser session.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

impl Browser {
    /// Starts chromedriver and a headless chromium (a fresh profile in `profile`).
    pub fn start(profile: &std::path::Path) -> Self {
        test_support::require("chromedriver", "chromium-driver");
        test_support::require_file(std::path::Path::new("/usr/bin/chromium"), "chromium");
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        wait_until(
            "chromedriver to listen",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || std::net::TcpStream::connect(("127.0.0.1", port)).ok(),
        )
        .expect("chromedriver listens");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1400",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let mut browser = Self {
            driver,
            port,
            session: String::new(),
        };
        let answer = browser.call("POST", "/session", &capabilities);
        browser.session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}"))
            .to_owned();
        browser
    }

    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let (status, value) = webdriver(self.port, method, path, &body.to_string());
        assert!(status == 200, "WebDriver {method} {path}: {status} {value}");
        value["value"].clone()
    }

    /// Opens `url`.
    pub fn open(&self, url: &str) {
        self.call(
            "POST",
            &format!("/session/{}/url", self.session),
            &json!({ "url": url }),
        );
    }

    /// Runs `script` (a function body; `arguments` are `args`) and returns its value.
    pub fn run(&self, script: &str, args: &[Value]) -> Value {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            &json!({ "script": script, "args": args }),
        )
    }

    /// Runs `script` until it returns something other than null or false.
    pub fn wait_for(&self, what: &str, within: Duration, script: &str) -> Value {
        wait_until(what, within, Duration::from_millis(250), || {
            let value = self.run(script, &[]);
            (!value.is_null() && value != Value::Bool(false)).then_some(value)
        })
        .unwrap_or_else(|e| {
            let text = self.run("return document.body.innerText", &[]);
            let console = self.call(
                "POST",
                &format!("/session/{}/se/log", self.session),
                &json!({"type": "browser"}),
            );
            panic!(
                "{e}; the page shows:\n{}\nthe browser's console: {console}",
                text.as_str().unwrap_or_default()
            )
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = std::panic::catch_unwind(|| {
                webdriver(
                    self.port,
                    "DELETE",
                    &format!("/session/{}", self.session),
                    "{}",
                )
            });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// One WebDriver call: chromedriver keeps connections open, so the answer is read by its
/// `Content-Length`.
fn webdriver(port: u16, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("chromedriver");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("request");
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut answer = vec![0u8; length];
    reader.read_exact(&mut answer).expect("body");
    let value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
    (status, value)
}
