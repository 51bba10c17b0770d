//! Serving the embedded API over plain HTTP/1 on a TCP listener (for
//! kubectl or out-of-process clients).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::BodyExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::error::ApiError;
use crate::service::{error_response, handle};
use crate::{EmbeddedApi, Error, Inner};

/// A running HTTP listener started by [`EmbeddedApi::serve`]. Dropping it
/// does not stop the server; call [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// A kubeconfig (YAML) pointing at this server, for kubectl.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: embedded\n  cluster:\n    server: {}\n\
             contexts:\n- name: embedded\n  context:\n    cluster: embedded\n    user: embedded\n    namespace: default\n\
             current-context: embedded\nusers:\n- name: embedded\n  user: {{}}\n",
            self.url()
        )
    }

    /// Stop accepting connections (open connections finish on their own).
    pub fn shutdown(self) {
        self.task.abort();
    }

    /// Wait until the accept loop ends (it normally runs forever).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

async fn serve_conn(inner: Arc<Inner>, stream: tokio::net::TcpStream) {
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let inner = inner.clone();
        async move {
            let (parts, body) = req.into_parts();
            let resp = match body.collect().await {
                Ok(b) => handle(&inner, &parts, b.to_bytes()),
                Err(e) => error_response(&ApiError::bad_request(format!(
                    "failed to read request body: {e}"
                ))),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    if let Err(e) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!("embedded api connection error: {e}");
    }
}

impl EmbeddedApi {
    /// Serve this API over HTTP/1 on `addr` (use `127.0.0.1:0` for an
    /// ephemeral port). Returns once the listener is bound; the server runs
    /// on a spawned task.
    pub async fn serve(&self, addr: SocketAddr) -> Result<Server, Error> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(serve_conn(inner.clone(), stream));
                    }
                    Err(e) => {
                        tracing::warn!("embedded api accept error: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Server { local_addr, task })
    }
}
