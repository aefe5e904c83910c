use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};

use crate::qemu::{QmpClient, QmpError};

/// A PNG of the guest's display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screenshot {
    pub png: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ScreenshotError {
    #[error("the machine has no display to take a screenshot of")]
    NoDisplay,
    #[error("screendump failed")]
    Qmp(#[from] QmpError),
    #[error("failed to read the screendump file {path:?}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the screendump is not a valid {format} image: {reason}")]
    Decode {
        format: &'static str,
        reason: String,
    },
}

/// Whether this QEMU's `screendump` takes `format`, per QEMU version (asked once).
static PNG_SUPPORT: Mutex<Option<HashMap<String, bool>>> = Mutex::new(None);

/// Takes a screenshot through QMP `screendump` into `dir` (the VM's run dir) and returns
/// it as PNG: QEMU writes PNG itself when it can (7.2 can), otherwise PPM is converted.
pub async fn take_screenshot(
    qmp: &QmpClient,
    dir: &Path,
    timeout: Duration,
) -> Result<Screenshot, ScreenshotError> {
    let png = supports_png(qmp, timeout).await?;
    screenshot_as(qmp, dir, timeout, png).await
}

/// The fallback path on its own: PPM from QEMU, converted to PNG here.
pub async fn take_screenshot_ppm(
    qmp: &QmpClient,
    dir: &Path,
    timeout: Duration,
) -> Result<Screenshot, ScreenshotError> {
    screenshot_as(qmp, dir, timeout, false).await
}

async fn screenshot_as(
    qmp: &QmpClient,
    dir: &Path,
    timeout: Duration,
    png: bool,
) -> Result<Screenshot, ScreenshotError> {
    // One file per screenshot: the final one and those asked for on demand may overlap.
    static TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!(
        "screendump-{n}.{}",
        if png { "png" } else { "ppm" }
    ));
    let filename = path.display().to_string();
    let arguments = if png {
        json!({"filename": filename, "format": "png"})
    } else {
        json!({"filename": filename})
    };
    match qmp.execute("screendump", Some(arguments), timeout).await {
        Ok(_) => {}
        Err(QmpError::Command { desc, .. })
            if desc.contains("no console") || desc.contains("There is no") =>
        {
            return Err(ScreenshotError::NoDisplay);
        }
        Err(other) => return Err(other.into()),
    }
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|source| ScreenshotError::Read {
            path: filename.clone(),
            source,
        })?;
    let _ = tokio::fs::remove_file(&path).await;
    if png {
        let (width, height) = png_dimensions(&bytes).ok_or_else(|| ScreenshotError::Decode {
            format: "PNG",
            reason: "no IHDR header".into(),
        })?;
        Ok(Screenshot {
            png: bytes,
            width,
            height,
        })
    } else {
        tokio::task::spawn_blocking(move || ppm_to_png(&bytes))
            .await
            .map_err(|e| ScreenshotError::Decode {
                format: "PPM",
                reason: e.to_string(),
            })?
    }
}

async fn supports_png(qmp: &QmpClient, timeout: Duration) -> Result<bool, ScreenshotError> {
    let version = qmp.qemu_version().to_owned();
    if let Some(known) = PNG_SUPPORT
        .lock()
        .ok()
        .and_then(|cache| cache.as_ref().and_then(|c| c.get(&version).copied()))
    {
        return Ok(known);
    }
    let schema = qmp.execute("query-qmp-schema", None, timeout).await?;
    let supported = screendump_has_format(&schema);
    if let Ok(mut cache) = PNG_SUPPORT.lock() {
        cache
            .get_or_insert_with(HashMap::new)
            .insert(version, supported);
    }
    Ok(supported)
}

/// Whether the `screendump` command's argument type has a `format` member.
fn screendump_has_format(schema: &Value) -> bool {
    let Some(entities) = schema.as_array() else {
        return false;
    };
    let arg_type = entities
        .iter()
        .find(|e| e["name"] == "screendump" && e["meta-type"] == "command")
        .and_then(|e| e["arg-type"].as_str());
    let Some(arg_type) = arg_type else {
        return false;
    };
    entities
        .iter()
        .find(|e| e["name"] == arg_type)
        .and_then(|e| e["members"].as_array())
        .is_some_and(|members| members.iter().any(|m| m["name"] == "format"))
}

/// Width and height from a PNG's IHDR chunk.
fn png_dimensions(png: &[u8]) -> Option<(u32, u32)> {
    if png.len() < 24 || &png[..8] != b"\x89PNG\r\n\x1a\n" || &png[12..16] != b"IHDR" {
        return None;
    }
    let be = |at: usize| u32::from_be_bytes([png[at], png[at + 1], png[at + 2], png[at + 3]]);
    Some((be(16), be(20)))
}

fn ppm_to_png(ppm: &[u8]) -> Result<Screenshot, ScreenshotError> {
    let decoded =
        image::load_from_memory_with_format(ppm, image::ImageFormat::Pnm).map_err(|e| {
            ScreenshotError::Decode {
                format: "PPM",
                reason: e.to_string(),
            }
        })?;
    let mut png = Vec::new();
    decoded
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| ScreenshotError::Decode {
            format: "PNG",
            reason: e.to_string(),
        })?;
    Ok(Screenshot {
        png,
        width: decoded.width(),
        height: decoded.height(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppm_is_converted_to_png_with_its_size() {
        let mut ppm = b"P6\n3 2\n255\n".to_vec();
        ppm.extend(std::iter::repeat_n(0x7f, 3 * 2 * 3));
        let shot = ppm_to_png(&ppm).expect("valid PPM");
        assert_eq!((shot.width, shot.height), (3, 2));
        assert_eq!(png_dimensions(&shot.png), Some((3, 2)));
    }

    #[test]
    fn the_schema_tells_whether_png_is_supported() {
        let with = json!([
            {"name": "screendump", "meta-type": "command", "arg-type": "7"},
            {"name": "7", "meta-type": "object", "members": [{"name": "filename"}, {"name": "format"}]}
        ]);
        let without = json!([
            {"name": "screendump", "meta-type": "command", "arg-type": "7"},
            {"name": "7", "meta-type": "object", "members": [{"name": "filename"}]}
        ]);
        assert!(screendump_has_format(&with));
        assert!(!screendump_has_format(&without));
    }
}
