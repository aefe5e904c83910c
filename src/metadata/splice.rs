use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// The guestfwd helper: QEMU's user-mode network runs it once per guest connection to
/// 169.254.169.254:80, with that connection as stdin/stdout; it splices the connection
/// to the VM's metadata socket. Plain blocking I/O: it starts per connection, so it must
/// start fast.
///
/// It returns as soon as the service's side is done (the caller then exits, which closes
/// the guest's side): the service decides how long a connection lives (idle, over the
/// VM's connection cap, answered), never the guest. A guest that shuts its write side
/// still gets the answer: the upstream copy half-closes the service's side.
pub fn splice_stdio_to_socket(socket: &Path) -> std::io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    let mut to_service = stream.try_clone()?;
    // Detached: when the service is done, a guest still sending must not keep this
    // process (and its slot on the host) alive.
    std::thread::spawn(move || {
        let _ = copy(&mut std::io::stdin().lock(), &mut to_service);
        let _ = to_service.shutdown(Shutdown::Write);
    });
    let mut from_service = stream;
    copy(&mut from_service, &mut std::io::stdout().lock())
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
