//! The core's two seams over gRPC: [`RemoteTarget`] and [`RemoteDraft`]
//! implement `TargetSide` / `DraftSide` on one bidirectional session stream
//! each. They are driven from a blocking thread (the generation loop is
//! synchronous) and reach the async streams through the runtime handle.
//! Dropping them closes the streams, which frees the sessions on the
//! services. [`endpoint`] is how every channel to a service is made.

use std::time::Duration;

use duo_core::engine::{DraftJob, DraftSide, DraftTree, EngineError, TargetSide, TargetVerdict};
use duo_core::sampling::Distribution;
use duo_core::spec::verify::ChainVerdict;
use duo_rpc::convert::{proposal_to_pb, sync_to_pb, tree_from_pb};
use duo_rpc::pb::draft_client::DraftClient;
use duo_rpc::pb::target_client::TargetClient;
use duo_rpc::pb::{self, draft_reply, draft_request, target_reply, target_request};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

/// The endpoint of a channel to `address` (`host:port` or a URL), with
/// the connection settings every channel to a service shares.
pub(crate) fn endpoint(address: &str) -> Result<Endpoint, String> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Endpoint::from_shared(uri)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
        })
        .map_err(|e| format!("bad address {address:?}: {e}"))
}

/// The first remote failure seen, kept so the caller can answer the client
/// with the service's own status (e.g. INVALID_ARGUMENT) instead of a
/// generic one.
#[derive(Default)]
pub struct Failure(pub Option<Status>);

fn unavailable(side: &'static str, s: &Status) -> EngineError {
    EngineError::Unavailable(side, format!("{}: {}", s.code(), s.message()))
}

/// The session's next reply, or UNAVAILABLE when none comes within
/// `timeout` (naming the `flag` that sets it).
async fn next_within<T>(
    rx: &mut Streaming<T>,
    timeout: Duration,
    what: &str,
    flag: &str,
) -> Result<Option<T>, Status> {
    tokio::time::timeout(timeout, rx.message())
        .await
        .map_err(|_| {
            Status::unavailable(format!(
                "no {what} within {} ms ({flag})",
                timeout.as_millis()
            ))
        })?
}

/// A draft tree may take this many times the session's usual tree latency
/// before the worker counts as failed (it is then failed over, losslessly).
const DRAFT_DEADLINE_FACTOR: f64 = 8.0;
/// The adaptive draft deadline never drops below this: scheduling hiccups
/// of a busy host must not fail a healthy worker over.
const DRAFT_DEADLINE_FLOOR: Duration = Duration::from_millis(250);
/// Weight of each new tree latency in the session's average.
const DRAFT_LATENCY_ALPHA: f64 = 0.2;

/// A target session.
pub struct RemoteTarget {
    handle: Handle,
    tx: mpsc::Sender<pb::TargetRequest>,
    rx: Streaming<pb::TargetReply>,
    /// Longest wait for one verdict.
    timeout: Duration,
    pub failure: Failure,
}

impl RemoteTarget {
    /// Opens a session (async; call from the runtime).
    pub async fn open(
        mut client: TargetClient<Channel>,
        open: pb::OpenTarget,
        timeout: Duration,
    ) -> Result<(Self, pb::WorkerInfo), Status> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::TargetRequest {
            kind: Some(target_request::Kind::Open(open)),
        })
        .await
        .map_err(|_| Status::internal("target request channel closed"))?;
        let mut rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
        match rx.message().await? {
            Some(pb::TargetReply {
                kind: Some(target_reply::Kind::Opened(info)),
            }) => Ok((
                Self {
                    handle: Handle::current(),
                    tx,
                    rx,
                    timeout,
                    failure: Failure::default(),
                },
                info,
            )),
            _ => Err(Status::internal(
                "target-service did not acknowledge the session",
            )),
        }
    }
}

impl TargetSide for RemoteTarget {
    fn verify(
        &mut self,
        keep: usize,
        feed: &[u32],
        tail: &[u32],
        proposals: &[Distribution],
    ) -> Result<TargetVerdict, EngineError> {
        let req = pb::TargetRequest {
            kind: Some(target_request::Kind::Verify(pb::Verify {
                keep: keep as u32,
                feed: feed.to_vec(),
                tail_len: tail.len() as u32,
                proposals: proposals.iter().map(proposal_to_pb).collect(),
            })),
        };
        let (tx, rx, timeout) = (&self.tx, &mut self.rx, self.timeout);
        let reply = self.handle.block_on(async move {
            tx.send(req)
                .await
                .map_err(|_| Status::unavailable("target session closed"))?;
            next_within(rx, timeout, "verdict", "--target-timeout-ms").await
        });
        match reply {
            Ok(Some(pb::TargetReply {
                kind: Some(target_reply::Kind::Verdict(v)),
            })) => Ok(TargetVerdict {
                verdict: ChainVerdict {
                    accepted: v.accepted as usize,
                    next: v.next,
                },
                logprobs: v.logprobs,
                fed: v.fed as usize,
                secs: v.secs,
            }),
            Ok(_) => {
                let s = Status::unavailable("target-service ended the session");
                let e = unavailable("target-service", &s);
                self.failure.0.get_or_insert(s);
                Err(e)
            }
            Err(s) => {
                let e = unavailable("target-service", &s);
                self.failure.0.get_or_insert(s);
                Err(e)
            }
        }
    }
}

/// A draft session.
pub struct RemoteDraft {
    handle: Handle,
    tx: mpsc::Sender<pb::DraftRequest>,
    rx: Streaming<pb::DraftReply>,
    /// Longest wait for one tree: a worker that hangs counts as failed.
    /// The first tree (a full sync) gets all of it; later ones get
    /// [`DRAFT_DEADLINE_FACTOR`] times this session's average tree latency
    /// (at least [`DRAFT_DEADLINE_FLOOR`], at most `timeout`), so a frozen
    /// worker stalls a generation for a few rounds, not for `timeout`.
    timeout: Duration,
    /// When the pending job was sent.
    submitted: Option<std::time::Instant>,
    /// Average seconds from submit to tree, over this session.
    latency: duo_core::stats::Ema,
    /// The generation's vocabulary (a tree's proposals are checked against it).
    vocab: usize,
    /// The worker's model context, as its Opened reply said (0: undeclared).
    context_len: usize,
    pub failure: Failure,
}

impl RemoteDraft {
    /// Opens a session (async; call from the runtime).
    pub async fn open(
        mut client: DraftClient<Channel>,
        open: pb::OpenDraft,
        timeout: Duration,
    ) -> Result<(Self, pb::WorkerInfo), Status> {
        let (tx, rx) = mpsc::channel(4);
        let vocab = open.vocab_size as usize;
        tx.send(pb::DraftRequest {
            kind: Some(draft_request::Kind::Open(open)),
        })
        .await
        .map_err(|_| Status::internal("draft request channel closed"))?;
        let mut rx = client.session(ReceiverStream::new(rx)).await?.into_inner();
        match rx.message().await? {
            Some(pb::DraftReply {
                kind: Some(draft_reply::Kind::Opened(info)),
            }) => Ok((
                Self {
                    handle: Handle::current(),
                    tx,
                    rx,
                    timeout,
                    context_len: info.model.as_ref().map_or(0, |m| m.context_len as usize),
                    submitted: None,
                    latency: duo_core::stats::Ema::new(DRAFT_LATENCY_ALPHA),
                    vocab,
                    failure: Failure::default(),
                },
                info,
            )),
            _ => Err(Status::internal(
                "draft-service did not acknowledge the session",
            )),
        }
    }

    fn fail(&mut self, s: Status) -> EngineError {
        let e = unavailable("draft-service", &s);
        self.failure.0.get_or_insert(s);
        e
    }
}

impl DraftSide for RemoteDraft {
    fn context_len(&self) -> Option<usize> {
        (self.context_len > 0).then_some(self.context_len)
    }

    fn submit(&mut self, job: DraftJob) -> Result<(), EngineError> {
        let req = pb::DraftRequest {
            kind: Some(draft_request::Kind::Draft(pb::DraftJob {
                sync: Some(sync_to_pb(&job.sync)),
                gamma: job.gamma as u32,
                max_branches: job.policy.cap() as u32,
                first_verified: job.first_verified,
            })),
        };
        let tx = &self.tx;
        let sent = self.handle.block_on(async move { tx.send(req).await });
        self.submitted = Some(std::time::Instant::now());
        sent.map_err(|_| self.fail(Status::unavailable("draft session closed")))
    }

    fn collect(&mut self) -> Result<DraftTree, EngineError> {
        let deadline = match self.latency.get() {
            Some(secs) => Duration::from_secs_f64(secs * DRAFT_DEADLINE_FACTOR)
                .clamp(DRAFT_DEADLINE_FLOOR, self.timeout.max(DRAFT_DEADLINE_FLOOR)),
            None => self.timeout,
        };
        let submitted = self.submitted.take();
        let waited = submitted.map_or(Duration::ZERO, |t| t.elapsed());
        let (rx, remaining) = (&mut self.rx, deadline.saturating_sub(waited));
        let reply = self.handle.block_on(async move {
            tokio::time::timeout(remaining, rx.message())
                .await
                .map_err(|_| {
                    Status::unavailable(format!(
                        "no draft within {} ms ({DRAFT_DEADLINE_FACTOR}x the session's tree latency, at most --draft-timeout-ms)",
                        deadline.as_millis()
                    ))
                })?
        });
        if reply.is_ok()
            && let Some(t) = submitted
        {
            self.latency.update(t.elapsed().as_secs_f64());
        }
        match reply {
            Ok(Some(pb::DraftReply {
                kind: Some(draft_reply::Kind::Tree(t)),
            })) => tree_from_pb(t, self.vocab).map_err(|e| {
                self.fail(Status::internal(format!(
                    "draft-service sent a malformed tree: {e}"
                )))
            }),
            Ok(_) => Err(self.fail(Status::unavailable("draft-service ended the session"))),
            Err(s) => Err(self.fail(s)),
        }
    }
}
