//! A VM's agent port shared by everything that uses it while its job runs: the
//! artifact collection and the shells into it. QEMU's socket takes one connection at a
//! time, so they share one, and a shell opened during a collection rides on it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, OwnedMutexGuard};

use super::agent_port::{AgentClient, AgentError};
use super::shell::{Shell, ShellOpener, ShellRequest};

#[derive(Debug, Clone)]
pub struct AgentLink(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    socket: PathBuf,
    /// Held by whoever makes requests (one at a time); shells need it only to connect.
    client: Arc<Mutex<Option<AgentClient>>>,
    opener: std::sync::Mutex<Option<ShellOpener>>,
}

/// The connection, held for requests.
#[derive(Debug)]
pub struct LinkGuard {
    link: AgentLink,
    client: OwnedMutexGuard<Option<AgentClient>>,
}

impl AgentLink {
    pub fn new(socket: PathBuf) -> Self {
        Self(Arc::new(Inner {
            socket,
            client: Arc::new(Mutex::new(None)),
            opener: std::sync::Mutex::new(None),
        }))
    }

    /// The connection for requests, connected first if it is not up (waiting up to
    /// `wait` for the guest tools).
    pub async fn lock(&self, wait: Duration) -> Result<LinkGuard, AgentError> {
        let client = Arc::clone(&self.0.client).lock_owned().await;
        let mut guard = LinkGuard {
            link: self.clone(),
            client,
        };
        if guard.client.as_ref().is_none_or(AgentClient::is_closed) {
            guard.reconnect(wait).await?;
        }
        Ok(guard)
    }

    /// A shell in the guest, on the connection in use (connected first if none is).
    pub async fn open_shell(
        &self,
        request: &ShellRequest,
        wait: Duration,
    ) -> Result<Shell, AgentError> {
        let opener = self
            .0
            .opener
            .lock()
            .ok()
            .and_then(|o| o.clone())
            .filter(ShellOpener::is_alive);
        let opener = match opener {
            Some(opener) => opener,
            None => self.lock(wait).await?.client()?.shells(),
        };
        opener.open(request).await
    }

    /// Closes the connection (the VM is going away): its shells end.
    pub async fn close(&self) {
        *self.0.client.lock().await = None;
    }
}

impl LinkGuard {
    pub fn client(&mut self) -> Result<&mut AgentClient, AgentError> {
        self.client.as_mut().ok_or_else(|| {
            AgentError::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the agent port is not connected",
            ))
        })
    }

    /// Connects afresh: after a broken answer the rest of it may still be on the port.
    /// QEMU's socket takes one connection at a time, so the old one goes first (and its
    /// shells with it).
    pub async fn reconnect(&mut self, wait: Duration) -> Result<(), AgentError> {
        *self.client = None;
        let client = AgentClient::connect(&self.link.0.socket, wait).await?;
        if let Ok(mut opener) = self.link.0.opener.lock() {
            *opener = Some(client.shells());
        }
        *self.client = Some(client);
        Ok(())
    }
}
