//! The worker's web page (docs/api.md): `/ui` lists the jobs, `/ui/job?id=ID` shows one
//! (status, live log, screenshots, and a running job's display through noVNC). The
//! pages hold no data: their script reads it from the API with the user's token, so
//! they need none themselves. noVNC is served from the operator's copy (Debian's
//! `novnc`, worker.yml `api.novnc`), never from a CDN.

use std::path::Path;

use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, HeaderValue};
use hyper::{Request, StatusCode};

use super::{Reply, error, full};

const PAGE: &str = include_str!("ui/page.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");
/// Only this worker's own scripts, styles, images and WebSockets.
const POLICY: &str = "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; \
                      style-src 'self' 'unsafe-inline'; frame-ancestors 'none'";

/// `GET /ui…`.
pub(super) async fn serve(novnc: &Path, segments: &[&str], request: &Request<Incoming>) -> Reply {
    let mut reply = match segments {
        ["ui"] => page("jobs"),
        ["ui", "job"] => page("job"),
        ["ui", "app.js"] => full(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT),
        ["ui", "app.css"] => full(StatusCode::OK, "text/css; charset=utf-8", STYLE),
        ["ui", "novnc", rest @ ..] => return novnc_file(novnc, rest, request).await,
        _ => error(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no page {}", request.uri().path()),
        ),
    };
    let headers = reply.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("content-security-policy", HeaderValue::from_static(POLICY));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    reply
}

fn page(name: &str) -> Reply {
    full(
        StatusCode::OK,
        "text/html; charset=utf-8",
        PAGE.replace("{{PAGE}}", name),
    )
}

/// A file of noVNC's: plain names only (no `.` or `..` segment, nothing hidden).
async fn novnc_file(novnc: &Path, rest: &[&str], request: &Request<Incoming>) -> Reply {
    let plain = !rest.is_empty()
        && rest.iter().all(|s| {
            !s.is_empty()
                && !s.starts_with('.')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if !plain {
        return error(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no noVNC file {}", request.uri().path()),
        );
    }
    let path = rest.iter().fold(novnc.to_path_buf(), |p, s| p.join(s));
    let content_type = match path.extension().and_then(|e| e.to_str()) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let mut reply = full(StatusCode::OK, content_type, bytes);
            let headers = reply.headers_mut();
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=3600"));
            headers.insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            // noVNC's own pages (vnc.html) are served too: the same policy as ours.
            headers.insert("content-security-policy", HeaderValue::from_static(POLICY));
            reply
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && rest == ["core", "rfb.js"] => error(
            StatusCode::NOT_FOUND,
            "no-novnc",
            format!(
                "noVNC is not at {} (install Debian's novnc, or set worker.yml api.novnc)",
                novnc.display()
            ),
        ),
        Err(_) => error(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("no noVNC file {}", request.uri().path()),
        ),
    }
}
