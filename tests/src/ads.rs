//! A Rust client of the agent's aggregated discovery stream (delta xDS)
//! on its Unix socket, for benchmarks that open many streams at once.
//! Correctness tests use the independent grpcio client
//! (`tests/discovery_client.py`).

use std::path::Path;

use anyhow::Context;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mizzen_api::proto::discovery::{MORE, SERVICE_TYPE};
use prost::Message;
use tokio::sync::mpsc;

/// An open stream following every Service.
#[derive(Debug)]
pub struct AdsStream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    inbound: tonic::Streaming<DeltaDiscoveryResponse>,
}

/// What a push that came in several responses added up to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Received {
    pub responses: usize,
    pub resources: usize,
    pub bytes: usize,
    pub largest: usize,
}

impl AdsStream {
    /// Opens a stream presenting `token`, subscribed to every Service.
    pub async fn open(socket: &Path, token: &str) -> anyhow::Result<Self> {
        let channel = crate::sds::channel(socket).await?;
        let (tx, rx) = mpsc::channel(8);
        tx.send(DeltaDiscoveryRequest {
            type_url: SERVICE_TYPE.into(),
            ..Default::default()
        })
        .await
        .context("send")?;
        let outbound = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut req = tonic::Request::new(outbound);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let inbound = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .delta_aggregated_resources(req)
            .await?
            .into_inner();
        Ok(Self { tx, inbound })
    }

    /// The next response, ACKed.
    pub async fn next(&mut self) -> anyhow::Result<DeltaDiscoveryResponse> {
        let resp = self.inbound.message().await?.context("the agent closed the stream")?;
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            })
            .await
            .context("send ACK")?;
        Ok(resp)
    }

    /// Reads one whole push: responses until one that does not say
    /// [`MORE`].
    pub async fn push(&mut self) -> anyhow::Result<Received> {
        let mut got = Received::default();
        loop {
            let resp = self.next().await?;
            let len = resp.encoded_len();
            got.responses += 1;
            got.resources += resp.resources.len();
            got.bytes += len;
            got.largest = got.largest.max(len);
            if resp.system_version_info != MORE {
                return Ok(got);
            }
        }
    }
}
