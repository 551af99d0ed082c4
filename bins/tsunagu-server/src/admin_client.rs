//! The admin CLI's side of the admin API: HTTP/1.1 with JSON bodies over the server's
//! Unix socket. The socket's file mode (owner only) is the authentication: whoever can
//! open it is the admin.

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use std::path::{Path, PathBuf};
use tokio::net::UnixStream;

pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: &Path) -> Self {
        AdminClient {
            socket: socket.to_path_buf(),
        }
    }

    /// Send a request; returns the JSON answer, or the server's error message.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "cannot reach the server's admin socket {} (is `tsunagu-server serve` running with the same --data-dir?)",
                self.socket.display()
            )
        })?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .context("admin socket handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = match &body {
            Some(v) => Bytes::from(serde_json::to_vec(v)?),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "tsunagu-admin")
            .header("content-type", "application/json")
            .body(Full::new(bytes))?;
        let resp = sender.send_request(req).await.context("admin request")?;
        let status = resp.status();
        let data = resp.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = if data.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&data).with_context(|| {
                format!(
                    "admin API answered non-JSON: {}",
                    String::from_utf8_lossy(&data)
                )
            })?
        };
        if !status.is_success() {
            let msg = value
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            bail!("{msg}");
        }
        Ok(value)
    }
}
