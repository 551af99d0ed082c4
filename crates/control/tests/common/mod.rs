//! An in-process server on loopback with a temporary database, and simulated nodes.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;
use tsunagu_client::{ControlClient, MapStream};
use tsunagu_control::server::{Server, ServerConfig};
use tsunagu_control::state::State;
use tsunagu_proto::tailcfg::{
    CURRENT_CAPABILITY_VERSION, Hostinfo, MapRequest, RegisterRequest, RegisterResponse,
    RegisterResponseAuth,
};
use tsunagu_proto::{MachinePrivate, MachinePublic, NodePrivate};

pub struct TestServer {
    pub url: String,
    pub key: MachinePublic,
    pub state: Arc<State>,
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn server() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".into(),
        server_url: String::new(),
        tls: None,
        policy_file: None,
        admin_socket: dir.path().join("admin.sock"),
        ephemeral_timeout: Duration::from_secs(300),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    let cfg = ServerConfig {
        server_url: url.clone(),
        ..cfg
    };
    let server = Server::start(&cfg).await.unwrap();
    let key = server.public_key();
    let state = server.app.state.clone();
    let router = server.router();
    let task = tokio::spawn(async move {
        axum::serve(listener, router).await.unwrap();
    });
    TestServer {
        url,
        key,
        state,
        dir,
        task,
    }
}

/// A user and a reusable pre-auth key for it.
pub async fn user_key(s: &TestServer, name: &str, tags: &[&str]) -> String {
    let u = match s.state.store.get_user_by_name(name).await {
        Ok(u) => u,
        Err(_) => {
            let u = s.state.store.create_user(name).await.unwrap();
            s.state.upsert_user(u.clone());
            u
        }
    };
    let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
    let (_, key) = s
        .state
        .store
        .create_preauth_key(u.id, true, false, None, &tags)
        .await
        .unwrap();
    key
}

/// A simulated node: its keys and its control connection.
pub struct SimNode {
    pub machine: MachinePrivate,
    pub node: NodePrivate,
    pub client: ControlClient,
    pub hostname: String,
}

impl SimNode {
    pub async fn connect(s: &TestServer, hostname: &str) -> SimNode {
        let machine = MachinePrivate::generate();
        let client = ControlClient::connect(&s.url, &s.key, &machine)
            .await
            .unwrap();
        SimNode {
            machine,
            node: NodePrivate::generate(),
            client,
            hostname: hostname.into(),
        }
    }

    pub fn hostinfo(&self) -> Hostinfo {
        Hostinfo {
            hostname: self.hostname.clone(),
            os: "linux".into(),
            ..Hostinfo::default()
        }
    }

    pub fn register_request(&self, auth_key: Option<&str>) -> RegisterRequest {
        RegisterRequest {
            version: CURRENT_CAPABILITY_VERSION,
            node_key: self.node.public(),
            hostinfo: Some(self.hostinfo()),
            auth: auth_key.map(|k| RegisterResponseAuth {
                auth_key: k.into(),
                ..RegisterResponseAuth::default()
            }),
            ..RegisterRequest::default()
        }
    }

    pub async fn register(&mut self, auth_key: &str) -> RegisterResponse {
        let req = self.register_request(Some(auth_key));
        self.client.register(&req).await.unwrap()
    }

    pub fn map_request(&self, stream: bool) -> MapRequest {
        MapRequest {
            version: CURRENT_CAPABILITY_VERSION,
            compress: "zstd".into(),
            keep_alive: true,
            node_key: self.node.public(),
            stream,
            hostinfo: Some(self.hostinfo()),
            ..MapRequest::default()
        }
    }

    pub async fn stream(&mut self) -> MapStream {
        let req = self.map_request(true);
        self.client.map(&req).await.unwrap()
    }
}
