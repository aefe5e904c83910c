//! The worker's web page and a job's display, in a real headless browser (Debian's
//! chromium through chromedriver) on the test image under `serve`: the job list shows a
//! running job, its page's log grows while the job prints, and its noVNC view shows the
//! guest's screen: a region of the canvas matches a QMP screenshot taken at the same
//! moment, and the canvas is the display's size (taskcluster's DisplayTestCase
//! TestDisplays). The display WebSocket refuses a job without a display and one that
//! does not exist (TestInvalidDisplayName), and a plain GET of it. worker.yml's
//! periodic screenshots are taken while the job runs, bounded in count.

use std::io::{Read, Write};
use std::time::Duration;

use engine_tests::browser::Browser;
use engine_tests::{Job, Worker, base_config, free_port, wait_until, with_setting};

const READER: &str = "qwt_web-test-read-token-00000000000000000000000000000000000000000";
const T: Duration = Duration::from_secs(120);

/// A WebSocket upgrade of `path`, by hand: the status and body of the answer.
fn upgrade(port: u16, path: &str, token: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: binary, bearer.{token}\r\n\r\n"
    )
    .expect("request");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buffer) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&answer);
        if text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn the_web_page_lists_jobs_follows_a_log_and_shows_the_display() {
    let port = free_port();
    let sha256 = engine_tests::assets::sha256_hex(READER.as_bytes());
    // A screenshot every second while a command runs, three at most.
    let config = with_setting(
        &with_setting(
            &with_setting(&base_config(), "capacity", "2"),
            "debug",
            "{screenshotEverySeconds: 1, maxScreenshots: 3}",
        ),
        "api",
        &format!(
            "{{listen: \"127.0.0.1:{port}\", tokens: [{{name: viewer, scope: read, sha256: {sha256}}}]}}"
        ),
    );
    let worker = Worker::with_config(&config);
    let _serve = worker.serve();
    // Something on the screen to compare, then a line every 0.2 s for the log.
    let job = worker.submit(
        &Job::script(
            "printf '\\033[2J\\033[Hqemu-worker display test: %s\\n' $((6*7)) > /dev/tty0; \
             i=0; while [ $i -lt 3000 ]; do echo line-$i; i=$((i+1)); sleep 0.2; done",
        )
        .max_run_time(900),
    );
    let blind = worker.submit(
        &Job::script("sleep 600")
            .max_run_time(900)
            .extra("machine: {graphics: none}\n"),
    );
    wait_until(
        "both jobs to run",
        T * 2,
        Duration::from_millis(250),
        || {
            (worker.status(&job)["state"] == "running"
                && worker.status(&blind)["state"] == "running")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; serve said:\n{}", worker.serve_log()));
    // Running jobs log as soon as their command starts.
    worker.wait_for_log(&job, 1, "line-1");

    // The display WebSocket: no display, no job, no upgrade.
    let (status, body) = upgrade(port, &format!("/v1/jobs/{blind}/display"), READER);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("no-display"), "{body}");
    let (status, body) = upgrade(port, "/v1/jobs/no-such-job/display", READER);
    assert_eq!(status, 404, "{body}");
    let plain = test_support::http::request(
        port,
        "GET",
        &format!("/v1/jobs/{job}/display"),
        Some(READER),
        b"",
    );
    assert_eq!(plain.status, 400);
    assert!(String::from_utf8_lossy(&plain.body).contains("not-websocket"));

    let profile = tempfile::tempdir().expect("profile");
    let browser = Browser::start(profile.path());
    let base = format!("http://127.0.0.1:{port}");
    browser.open(&format!("{base}/ui#token={READER}"));
    browser.wait_for(
        "the job list to show the job running",
        T,
        &format!(
            "const row = document.querySelector('tr[data-job=\"{job}\"]'); \
             return row && row.dataset.state === 'running'"
        ),
    );
    let token_in_address = browser.run("return location.href", &[]);
    assert!(
        !token_in_address.to_string().contains("qwt_"),
        "the token leaves the address bar: {token_in_address}"
    );

    browser.open(&format!("{base}/ui/job?id={job}"));
    let line_of = |text: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("line-"))
            .filter_map(|n| n.trim().parse().ok())
            .max()
            .unwrap_or(0)
    };
    let first = browser.wait_for(
        "the log to show",
        T,
        "const log = document.getElementById('log'); \
         return log && log.textContent.includes('line-2') && log.textContent",
    );
    let first = line_of(first.as_str().expect("text"));
    let grown = browser.wait_for(
        "the log to grow",
        T,
        &format!(
            "const log = document.getElementById('log'); \
             return log.textContent.includes('line-{}') && log.textContent",
            first + 10
        ),
    );
    assert!(line_of(grown.as_str().expect("text")) >= first + 10);

    // The display: connected, drawn, and the guest's screen.
    let connected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        browser.wait_for(
            "the display to connect",
            T,
            "return document.getElementById('screen').dataset.state === 'connected'",
        )
    }));
    if let Err(panic) = connected {
        eprintln!("serve said:\n{}", worker.serve_log());
        std::panic::resume_unwind(panic);
    }
    let drawn = "const c = document.querySelector('#screen canvas'); \
         if (!c || !c.width) return false; \
         const d = c.getContext('2d').getImageData(0, 0, c.width, Math.min(c.height, 64)).data; \
         for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2]) return true; \
         return false";
    browser.wait_for("the display to draw", T, drawn);
    let region = "const c = document.querySelector('#screen canvas'); \
         const h = Math.min(c.height, 64); \
         const d = c.getContext('2d').getImageData(0, 0, c.width, h).data; \
         let s = ''; for (let i = 0; i < d.length; i += 4) \
           s += String.fromCharCode(d[i], d[i + 1], d[i + 2]); \
         return [c.width, c.height, h, btoa(s)]";
    let mut matched = None;
    for _ in 0..5 {
        let canvas = browser.run(region, &[]);
        let shot = test_support::http::request(
            port,
            "POST",
            &format!("/v1/jobs/{job}/screenshots"),
            Some(READER),
            b"",
        );
        assert_eq!(shot.status, 200, "{}", String::from_utf8_lossy(&shot.body));
        let png = image::load_from_memory(&shot.body)
            .expect("a PNG")
            .to_rgb8();
        let (width, height, rows) = (
            canvas[0].as_u64().expect("width") as u32,
            canvas[1].as_u64().expect("height") as u32,
            canvas[2].as_u64().expect("rows") as u32,
        );
        assert_eq!(
            (width, height),
            png.dimensions(),
            "the canvas is the display's size"
        );
        let pixels = base64_decode(canvas[3].as_str().expect("pixels"));
        let mut same = 0usize;
        let mut colors = std::collections::BTreeSet::new();
        for y in 0..rows {
            for x in 0..width {
                let at = ((y * width + x) * 3) as usize;
                let ours = &pixels[at..at + 3];
                colors.insert([ours[0], ours[1], ours[2]]);
                if ours == png.get_pixel(x, y).0 {
                    same += 1;
                }
            }
        }
        let share = same as f64 / f64::from(rows * width);
        assert!(colors.len() >= 2, "the region shows something: {colors:?}");
        // A cursor may blink between the two: nearly every pixel, not all of them.
        if share >= 0.99 {
            matched = Some(share);
            break;
        }
        matched = matched.or(Some(share)).map(|m: f64| m.max(share));
    }
    let share = matched.unwrap_or(0.0);
    assert!(
        share >= 0.99,
        "the canvas matches the QMP screenshot in {:.1}% of its pixels",
        share * 100.0
    );
    drop(browser);
    let _ = worker.cli(&["cancel", &job]);
    let _ = worker.cli(&["cancel", &blind]);

    // The screenshots taken while it ran: three, listed in its report, each a PNG of
    // the display; no fourth.
    wait_until("the job to end", T, Duration::from_millis(250), || {
        (worker.status(&job)["state"] == "exception").then_some(())
    })
    .expect("canceled");
    let report = &worker.status(&job)["report"];
    assert_eq!(
        report["screenshots"],
        serde_json::json!([
            "screenshots/every-0001.png",
            "screenshots/every-0002.png",
            "screenshots/every-0003.png"
        ]),
        "{report}"
    );
    let every = test_support::http::request(
        port,
        "GET",
        &format!("/v1/jobs/{job}/screenshots/every-0002.png"),
        Some(READER),
        b"",
    );
    assert_eq!(every.status, 200);
    assert!(every.body.starts_with(b"\x89PNG\r\n\x1a\n"));
    let none = test_support::http::request(
        port,
        "GET",
        &format!("/v1/jobs/{job}/screenshots/every-0004.png"),
        Some(READER),
        b"",
    );
    assert_eq!(none.status, 404);
    assert!(String::from_utf8_lossy(&none.body).contains("no-screenshot"));
}

fn base64_decode(text: &str) -> Vec<u8> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, text).expect("base64")
}
