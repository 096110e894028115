//! [`Store`] and [`Election`] on etcd (v3 API, etcd 3.4+) through etcd-client.

use super::{
    Election, Fence, KeyValue, LeaderInfo, Leadership, LeaseId, Store, StoreError, Watch,
    WatchEvent, Write,
};
use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, LeaderKey,
    PutOptions, ResignOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use ftvm_tls::EtcdAccess;
use std::time::Duration;
use tokio::sync::mpsc;

fn etcd(operation: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |source| StoreError::Etcd { operation, source }
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    Ok(KeyValue {
        key: kv.key_str().map_err(|_| StoreError::NotUtf8)?.to_owned(),
        value: kv.value().to_vec(),
        lease: kv.lease(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

/// etcd as the [`Store`]. Clones share one connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (`http://127.0.0.1:2379`) with `access` (TLS
    /// and/or a user), failing after `timeout` if none answers.
    pub async fn connect(
        endpoints: &[String],
        access: &EtcdAccess,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = access.connect_options(
            ConnectOptions::new()
                .with_connect_timeout(timeout)
                .with_timeout(timeout)
                .with_keep_alive(Duration::from_secs(5), timeout),
        );
        let urls: Vec<String> = endpoints.iter().map(|e| access.url(e)).collect();
        let endpoints = &urls[..];
        let connect_error = |source| StoreError::Connect {
            endpoints: endpoints.join(","),
            source,
        };
        let mut client = Client::connect(endpoints, Some(options))
            .await
            .map_err(connect_error)?;
        // connect() is lazy about the first request: make one so a dead etcd shows now.
        client
            .get("/ft/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(connect_error)?;
        Ok(Self { client })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let response = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(etcd("get"))?;
        response.kvs().first().map(convert).transpose()
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<(), StoreError> {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        self.client
            .clone()
            .put(key, value, options)
            .await
            .map_err(|source| lease_error(source, lease, "put"))?;
        Ok(())
    }

    async fn create(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<bool, StoreError> {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, options)]);
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|source| lease_error(source, lease, "create"))?;
        Ok(response.succeeded())
    }

    async fn put_if_unchanged(
        &self,
        key: &str,
        value: Vec<u8>,
        mod_revision: i64,
    ) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_ignore_lease()),
            )]);
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(etcd("compare-and-put"))?;
        Ok(response.succeeded())
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let response = self
            .client
            .clone()
            .delete(key, None)
            .await
            .map_err(etcd("delete"))?;
        Ok(response.deleted() > 0)
    }

    async fn delete_prefix(&self, prefix: &str) -> Result<u64, StoreError> {
        let response = self
            .client
            .clone()
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await
            .map_err(etcd("delete"))?;
        Ok(u64::try_from(response.deleted()).unwrap_or(0))
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let response = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(etcd("list"))?;
        response.kvs().iter().map(convert).collect()
    }

    async fn watch_prefix(&self, prefix: &str) -> Result<Watch, StoreError> {
        let mut stream = self
            .client
            .clone()
            .watch(prefix, Some(WatchOptions::new().with_prefix()))
            .await
            .map_err(etcd("watch"))?;
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // The stream (and with it the request half, which must stay open) lives here
            // until the etcd side ends or the receiver is dropped.
            loop {
                tokio::select! {
                    () = sender.closed() => break,
                    message = stream.message() => {
                        let Ok(Some(response)) = message else { break };
                        if response.canceled() {
                            break;
                        }
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            let Ok(kv) = convert(kv) else { continue };
                            let event = match event.event_type() {
                                EventType::Put => WatchEvent::Put(kv),
                                EventType::Delete => WatchEvent::Delete(kv.key),
                            };
                            if sender.send(event).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(Watch::new(receiver))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let response = self
            .client
            .clone()
            .lease_grant(seconds, None)
            .await
            .map_err(etcd("lease grant"))?;
        Ok(response.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let failed = |source| lease_error(source, Some(lease), "lease keep-alive");
        let (mut keeper, mut responses) = self
            .client
            .clone()
            .lease_keep_alive(lease)
            .await
            .map_err(failed)?;
        keeper.keep_alive().await.map_err(failed)?;
        match responses.message().await.map_err(failed)? {
            Some(response) if response.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseExpired(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.client
            .clone()
            .lease_revoke(lease)
            .await
            .map_err(|source| lease_error(source, Some(lease), "lease revoke"))?;
        Ok(())
    }

    async fn commit(&self, fence: &Fence, writes: &[Write]) -> Result<bool, StoreError> {
        let mut compares = vec![Compare::create_revision(
            fence.key.as_str(),
            CompareOp::Equal,
            fence.revision,
        )];
        let mut operations = Vec::with_capacity(writes.len());
        for write in writes {
            match write {
                Write::Put { key, value } => {
                    operations.push(TxnOp::put(key.as_str(), value.clone(), None));
                }
                Write::Create { key, value } => {
                    compares.push(Compare::create_revision(key.as_str(), CompareOp::Equal, 0));
                    operations.push(TxnOp::put(key.as_str(), value.clone(), None));
                }
                Write::Delete { key } => operations.push(TxnOp::delete(key.as_str(), None)),
                Write::DeleteExisting { key } => {
                    compares.push(Compare::create_revision(
                        key.as_str(),
                        CompareOp::Greater,
                        0,
                    ));
                    operations.push(TxnOp::delete(key.as_str(), None));
                }
                Write::DeletePrefix { prefix } => operations.push(TxnOp::delete(
                    prefix.as_str(),
                    Some(DeleteOptions::new().with_prefix()),
                )),
            }
        }
        // When a comparison fails, the leadership key tells whether it was the fence.
        let txn = Txn::new()
            .when(compares)
            .and_then(operations)
            .or_else([TxnOp::get(fence.key.as_str(), None)]);
        let response = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(etcd("fenced write"))?;
        if response.succeeded() {
            return Ok(true);
        }
        let fence_held = response.op_responses().iter().any(|answer| {
            matches!(answer, TxnOpResponse::Get(got) if got
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == fence.revision))
        });
        if fence_held {
            Ok(false)
        } else {
            Err(StoreError::Fenced {
                key: fence.key.clone(),
            })
        }
    }
}

/// etcd answers "requested lease not found" for puts on an expired lease: say so.
fn lease_error(
    source: etcd_client::Error,
    lease: Option<LeaseId>,
    operation: &'static str,
) -> StoreError {
    match lease {
        Some(id) if source.to_string().contains("lease not found") => StoreError::LeaseExpired(id),
        _ => StoreError::Etcd { operation, source },
    }
}

/// etcd's v3election service as the [`Election`].
#[derive(Clone)]
pub struct EtcdElection {
    client: Client,
    name: String,
}

impl std::fmt::Debug for EtcdElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdElection")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl EtcdElection {
    /// The election called `name` on the etcd at `endpoints`. It has a connection of its
    /// own without a request timeout, because a campaign waits as long as another
    /// candidate leads.
    pub async fn connect(
        endpoints: &[String],
        access: &EtcdAccess,
        connect_timeout: Duration,
        name: &str,
    ) -> Result<Self, StoreError> {
        let options = access.connect_options(
            ConnectOptions::new()
                .with_connect_timeout(connect_timeout)
                .with_keep_alive(Duration::from_secs(5), connect_timeout),
        );
        let urls: Vec<String> = endpoints.iter().map(|e| access.url(e)).collect();
        let endpoints = &urls[..];
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| StoreError::Connect {
                endpoints: endpoints.join(","),
                source,
            })?;
        Ok(Self {
            client,
            name: name.to_owned(),
        })
    }
}

#[async_trait]
impl Election for EtcdElection {
    async fn campaign(&self, value: Vec<u8>, lease: LeaseId) -> Result<Leadership, StoreError> {
        let response = self
            .client
            .clone()
            .campaign(self.name.as_str(), value, lease)
            .await
            .map_err(|source| lease_error(source, Some(lease), "campaign"))?;
        let key = response.leader().ok_or(StoreError::LeaseExpired(lease))?;
        Ok(Leadership {
            name: self.name.clone(),
            key: key.key_str().map_err(|_| StoreError::NotUtf8)?.to_owned(),
            revision: key.rev(),
            lease: key.lease(),
        })
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        match self.client.clone().leader(self.name.as_str()).await {
            Ok(response) => match response.kv() {
                Some(kv) => {
                    let kv = convert(kv)?;
                    Ok(Some(LeaderInfo {
                        key: kv.key,
                        value: kv.value,
                    }))
                }
                None => Ok(None),
            },
            // etcd answers an election without candidates with an error, not an empty reply.
            Err(err) if err.to_string().contains("no leader") => Ok(None),
            Err(source) => Err(StoreError::Etcd {
                operation: "leader",
                source,
            }),
        }
    }

    async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        let key = LeaderKey::new()
            .with_name(leadership.name.as_str())
            .with_key(leadership.key.as_str())
            .with_rev(leadership.revision)
            .with_lease(leadership.lease);
        self.client
            .clone()
            .resign(Some(ResignOptions::new().with_leader(key)))
            .await
            .map_err(etcd("resign"))?;
        Ok(())
    }
}
