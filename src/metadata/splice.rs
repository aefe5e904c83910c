use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The guestfwd helper: QEMU's user-mode network runs it once per guest connection to
/// 169.254.169.254:80, with that connection as stdin/stdout; it splices the connection
/// to the VM's metadata socket until both directions are done. Plain blocking I/O: it
/// starts per connection, so it must start fast.
pub fn splice_stdio_to_socket(socket: &Path) -> std::io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    let mut to_service = stream.try_clone()?;
    let upstream = std::thread::spawn(move || {
        let result = copy(&mut std::io::stdin().lock(), &mut to_service);
        let _ = to_service.shutdown(Shutdown::Write);
        result
    });
    let mut from_service = stream;
    let down = copy(&mut from_service, &mut std::io::stdout().lock());
    let up = upstream
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the upstream copy panicked")));
    up.and(down)
}

/// Copies with a flush per read, so that streamed responses are not held back.
fn copy(from: &mut impl Read, to: &mut impl Write) -> std::io::Result<()> {
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        to.write_all(&buffer[..n])?;
        to.flush()?;
    }
}
