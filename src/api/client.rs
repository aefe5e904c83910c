//! A client of the API: what the CLI's `--server` commands use, and the HTTP client a
//! worker passes requests on to its peers with (both trust `client.caFile`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::ClientConfig;

use super::model::ApiError;

/// Why a request to the API did not get the answer it asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server {server:?}: not http://HOST:PORT, https://HOST:PORT or unix:PATH")]
    BadServer { server: String },
    #[error("cannot read the token file {}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token (from {from}) is not a single line of printable text")]
    BadToken { from: String },
    #[error("cannot use the CA file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("the API at {server} does not answer")]
    Unreachable {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the API at {server} answered {status} {code}: {message}")]
    Api {
        server: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("the API at {server} sent a reply that is not what it documents: {reason}")]
    NotJson { server: String, reason: String },
    #[error("the API at {server} broke off its reply")]
    BadReply {
        server: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// The HTTP status of an answer that was an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The HTTP client for `config`'s servers: the system's roots plus `caFile`.
pub fn http_client(config: &ClientConfig) -> Result<reqwest::Client, ClientError> {
    crate::image::install_crypto_provider();
    // No redirects: an API never sends one, and a token must not follow one elsewhere.
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("qemu-worker/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &config.ca_file {
        let bad = |reason: String| ClientError::CaFile {
            path: path.clone(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let certificates =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
        if certificates.is_empty() {
            return Err(bad("it holds no PEM certificate".to_owned()));
        }
        builder = builder.tls_certs_merge(certificates);
    }
    builder.build().map_err(|e| ClientError::CaFile {
        path: config.ca_file.clone().unwrap_or_default(),
        reason: crate::error_chain::display_chain(&e),
    })
}

/// The largest JSON reply read (a page of 1,000 jobs with their reports fits).
const MAX_JSON: usize = 64 << 20;
/// The largest error reply read.
const MAX_ERROR: usize = 64 << 10;

/// One server of the API, with the token the requests carry.
pub struct ApiClient {
    server: String,
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl std::fmt::Debug for ApiClient {
    // Never the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// `server` is `http(s)://HOST:PORT` or `unix:PATH`; the token is
    /// `QEMU_WORKER_TOKEN`'s, else `client.tokenFile`'s, else none.
    pub fn new(server: &str, config: &ClientConfig) -> Result<Self, ClientError> {
        let token = match std::env::var("QEMU_WORKER_TOKEN") {
            Ok(token) => Some(checked_token(token, "QEMU_WORKER_TOKEN")?),
            Err(_) => match &config.token_file {
                Some(path) => Some(checked_token(
                    read_token(path)?,
                    &path.display().to_string(),
                )?),
                None => None,
            },
        };
        let (base, http) = if let Some(path) = server.strip_prefix("unix:") {
            crate::image::install_crypto_provider();
            let http = reqwest::Client::builder()
                .unix_socket(Path::new(path))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|source| ClientError::Unreachable {
                    server: server.to_owned(),
                    source,
                })?;
            ("http://localhost".to_owned(), http)
        } else {
            let base = server.trim_end_matches('/');
            let valid = base
                .strip_prefix("http://")
                .or_else(|| base.strip_prefix("https://"))
                .is_some_and(|host| !host.is_empty() && !host.contains('/'));
            if !valid {
                return Err(ClientError::BadServer {
                    server: server.to_owned(),
                });
            }
            (base.to_owned(), http_client(config)?)
        };
        Ok(Self {
            server: server.to_owned(),
            base,
            token,
            http,
        })
    }

    /// GET `path` (with its query): the answer when it is a success.
    pub async fn get(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    /// POST `body` to `path`.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> Result<reqwest::Response, ClientError> {
        self.send(self.http.post(format!("{}{path}", self.base)).body(body))
            .await
    }

    /// GET `path` and read its JSON answer.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, ClientError> {
        self.read_json(self.get(path).await?).await
    }

    /// A success's JSON body.
    pub async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        answer: reqwest::Response,
    ) -> Result<T, ClientError> {
        let body = self.bounded(answer, MAX_JSON).await?;
        serde_json::from_slice(&body).map_err(|e| ClientError::NotJson {
            server: self.server.clone(),
            reason: e.to_string(),
        })
    }

    /// A body of at most `limit` bytes (a server is not trusted to end it).
    pub async fn bounded(
        &self,
        mut answer: reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let mut body = Vec::new();
        while let Some(chunk) = answer.chunk().await.map_err(|e| self.broken(e))? {
            if body.len() + chunk.len() > limit {
                return Err(ClientError::NotJson {
                    server: self.server.clone(),
                    reason: format!("the reply is larger than {limit} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// A broken body of a success, as an error naming the server.
    pub fn broken(&self, source: reqwest::Error) -> ClientError {
        ClientError::BadReply {
            server: self.server.clone(),
            source,
        }
    }

    /// Opens the WebSocket at `path` (with its query).
    pub async fn websocket(&self, path: &str) -> Result<reqwest::Upgraded, ClientError> {
        let mut key = [0u8; 16];
        let _ = rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty());
        let request = self
            .http
            .get(format!("{}{path}", self.base))
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header(
                "sec-websocket-key",
                base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key),
            );
        let answer = self.sent(request).await?;
        if answer.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return Err(self.refused(answer).await);
        }
        answer.upgrade().await.map_err(|e| self.broken(e))
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let answer = self.sent(request).await?;
        if answer.status().is_success() {
            return Ok(answer);
        }
        Err(self.refused(answer).await)
    }

    /// `request` with the token, sent: its answer, whatever its status.
    async fn sent(
        &self,
        mut request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
            .send()
            .await
            .map_err(|source| ClientError::Unreachable {
                server: self.server.clone(),
                source,
            })
    }

    /// The error an answer that is not a success says.
    async fn refused(&self, answer: reqwest::Response) -> ClientError {
        let status = answer.status().as_u16();
        let text = match self.bounded(answer, MAX_ERROR).await {
            Ok(body) => String::from_utf8_lossy(&body).into_owned(),
            Err(_) => String::new(),
        };
        let (code, message) = match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => (e.code, e.message),
            Err(_) => ("unexpected".to_owned(), text.chars().take(500).collect()),
        };
        ClientError::Api {
            server: self.server.clone(),
            status,
            code,
            message,
        }
    }
}

fn read_token(path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path).map_err(|source| ClientError::TokenFile {
        path: path.to_path_buf(),
        source,
    })
}

/// The token without its trailing newline; refused when it could not be a header value.
fn checked_token(token: String, from: &str) -> Result<String, ClientError> {
    let token = token.trim().to_owned();
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ClientError::BadToken {
            from: from.to_owned(),
        });
    }
    Ok(token)
}
