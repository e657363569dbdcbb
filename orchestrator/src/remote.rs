//! The core's two seams over gRPC: [`RemoteTarget`] and [`RemoteDraft`]
//! implement `TargetSide` / `DraftSide` on one bidirectional session stream
//! each. They are driven from a blocking thread (the generation loop is
//! synchronous) and reach the async streams through the runtime handle.
//! Dropping them closes the streams, which frees the sessions on the
//! services. [`endpoint`] is how every channel to a service is made.
//!
//! A side's failure reaches the loop as [`EngineError::Side`]: what its
//! status code means ([`duo_rpc::status::remote_kind`], read here and
//! nowhere else) and its message ([`Side::error`]).

use std::time::Duration;

use duo_core::engine::{
    DraftJob, DraftSide, DraftTree, EngineError, ErrorKind, TargetSide, TargetVerdict,
};
use duo_core::sampling::Distribution;
use duo_core::speculative::verify::ChainVerdict;
use duo_rpc::convert::{proposal_to_pb, sync_to_pb, tree_from_pb};
use duo_rpc::pb::draft_client::DraftClient;
use duo_rpc::pb::target_client::TargetClient;
use duo_rpc::pb::{self, draft_reply, draft_request, target_reply, target_request};
use duo_rpc::status::remote_kind;
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

/// A remote side, as its errors name it: which service, and where.
#[derive(Debug, Clone)]
pub(crate) struct Side {
    name: &'static str,
    /// Said of the side when it is unavailable.
    whereabouts: String,
}

impl Side {
    /// The target-service at `address` (when it is unavailable, the client
    /// is told that the orchestrator reconnects by itself).
    pub(crate) fn target(address: &str) -> Self {
        Self {
            name: "target-service",
            whereabouts: format!(
                "at {address}; the orchestrator reconnects when it is back, retry then"
            ),
        }
    }

    /// A draft-service worker at `address`.
    pub(crate) fn draft(address: &str) -> Self {
        Self {
            name: "draft-service",
            whereabouts: format!("at {address}"),
        }
    }

    /// The side's status as the loop sees it: the kind its code means
    /// ([`remote_kind`]: a refusal keeps its kind, anything else is the
    /// side being unavailable) and the side's message.
    pub(crate) fn error(&self, s: &Status) -> EngineError {
        self.failure(remote_kind(s.code()), s.message())
    }

    /// The side unavailable: the session broke, or it did not answer.
    pub(crate) fn unavailable(&self, why: &str) -> EngineError {
        self.failure(ErrorKind::Unavailable, why)
    }

    fn failure(&self, kind: ErrorKind, message: &str) -> EngineError {
        let message = match kind {
            ErrorKind::Unavailable => format!("{message} ({})", self.whereabouts),
            _ => message.to_string(),
        };
        EngineError::Side {
            side: self.name,
            kind,
            message,
        }
    }
}

/// The session's next reply; the side unavailable when none comes within
/// `timeout` (`late` says what did not come in time, and what set it).
async fn next_within<T>(
    rx: &mut Streaming<T>,
    timeout: Duration,
    side: &Side,
    late: impl FnOnce() -> String,
) -> Result<Option<T>, EngineError> {
    match tokio::time::timeout(timeout, rx.message()).await {
        Ok(reply) => reply.map_err(|s| side.error(&s)),
        Err(_) => Err(side.unavailable(&late())),
    }
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
    side: Side,
}

impl RemoteTarget {
    /// Opens a session on the target at `side` (async; call from the
    /// runtime). A refusal keeps the target's status (e.g. its KV budget is
    /// full: RESOURCE_EXHAUSTED), see [`Side::error`].
    pub async fn open(
        mut client: TargetClient<Channel>,
        side: Side,
        open: pb::OpenTarget,
        timeout: Duration,
    ) -> Result<(Self, pb::WorkerInfo), EngineError> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::TargetRequest {
            kind: Some(target_request::Kind::Open(open)),
        })
        .await
        .map_err(|_| side.unavailable("the session's request channel closed"))?;
        let mut rx = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| side.error(&s))?
            .into_inner();
        match rx.message().await.map_err(|s| side.error(&s))? {
            Some(pb::TargetReply {
                kind: Some(target_reply::Kind::Opened(info)),
            }) => Ok((
                Self {
                    handle: Handle::current(),
                    tx,
                    rx,
                    timeout,
                    side,
                },
                info,
            )),
            _ => Err(side.unavailable("it did not acknowledge the session")),
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
        let (tx, rx, timeout, side) = (&self.tx, &mut self.rx, self.timeout, &self.side);
        let reply = self.handle.block_on(async move {
            let sent = tx.send(req).await;
            let late = || {
                format!(
                    "no verdict within {} ms (--target-timeout-ms)",
                    timeout.as_millis()
                )
            };
            let reply = next_within(rx, timeout, side, late).await;
            match (sent, reply) {
                // The session was over: its last status says why (e.g. it
                // idled past the target's --session-ttl-s).
                (Err(_), Ok(_)) => Err(side.unavailable("the target session closed")),
                (_, reply) => reply,
            }
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
            Ok(_) => Err(self.side.unavailable("it ended the session")),
            Err(e) => Err(e),
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
    side: Side,
    /// Why the session last failed.
    pub failure: Option<String>,
}

impl RemoteDraft {
    /// Opens a session on the worker at `side` (async; call from the
    /// runtime).
    pub async fn open(
        mut client: DraftClient<Channel>,
        side: Side,
        open: pb::OpenDraft,
        timeout: Duration,
    ) -> Result<(Self, pb::WorkerInfo), EngineError> {
        let (tx, rx) = mpsc::channel(4);
        let vocab = open.vocab_size as usize;
        tx.send(pb::DraftRequest {
            kind: Some(draft_request::Kind::Open(open)),
        })
        .await
        .map_err(|_| side.unavailable("the session's request channel closed"))?;
        let mut rx = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| side.error(&s))?
            .into_inner();
        match rx.message().await.map_err(|s| side.error(&s))? {
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
                    side,
                    failure: None,
                },
                info,
            )),
            _ => Err(side.unavailable("it did not acknowledge the session")),
        }
    }

    /// Records the session's first failure (why the worker is taken out
    /// of rotation when the loop recovers) and returns it.
    fn fail(&mut self, e: EngineError) -> EngineError {
        self.failure.get_or_insert_with(|| e.to_string());
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
                max_hedges: job.max_hedges as u32,
            })),
        };
        let tx = &self.tx;
        let sent = self.handle.block_on(async move { tx.send(req).await });
        self.submitted = Some(std::time::Instant::now());
        sent.map_err(|_| {
            let e = self.side.unavailable("the draft session closed");
            self.fail(e)
        })
    }

    fn collect(&mut self) -> Result<DraftTree, EngineError> {
        let deadline = match self.latency.get() {
            Some(secs) => Duration::from_secs_f64(secs * DRAFT_DEADLINE_FACTOR)
                .clamp(DRAFT_DEADLINE_FLOOR, self.timeout.max(DRAFT_DEADLINE_FLOOR)),
            None => self.timeout,
        };
        let submitted = self.submitted.take();
        let waited = submitted.map_or(Duration::ZERO, |t| t.elapsed());
        let (rx, remaining, side) = (&mut self.rx, deadline.saturating_sub(waited), &self.side);
        let late = || {
            format!(
                "no draft within {} ms ({DRAFT_DEADLINE_FACTOR}x the session's tree latency, at most --draft-timeout-ms)",
                deadline.as_millis()
            )
        };
        let reply = self.handle.block_on(next_within(rx, remaining, side, late));
        if reply.is_ok()
            && let Some(t) = submitted
        {
            self.latency.update(t.elapsed().as_secs_f64());
        }
        match reply {
            Ok(Some(pb::DraftReply {
                kind: Some(draft_reply::Kind::Tree(t)),
            })) => tree_from_pb(t, self.vocab).map_err(|e| {
                let e = self
                    .side
                    .unavailable(&format!("it sent a malformed tree: {e}"));
                self.fail(e)
            }),
            Ok(_) => {
                let e = self.side.unavailable("it ended the session");
                Err(self.fail(e))
            }
            Err(e) => Err(self.fail(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use duo_rpc::status::engine_status;
    use tonic::Code;

    use super::*;

    #[test]
    fn a_sides_refusal_keeps_its_code_and_words_end_to_end() {
        let target = Side::target("10.0.0.1:50052");
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
        ] {
            let e = target.error(&Status::new(code, "the target's words"));
            assert!(
                matches!(
                    e,
                    EngineError::Side {
                        side: "target-service",
                        ..
                    }
                ),
                "{e:?}"
            );
            let s = engine_status(e);
            assert_eq!((s.code(), s.message()), (code, "the target's words"));
        }
    }

    #[test]
    fn a_broken_side_is_unavailable_and_named_with_its_address() {
        let target = Side::target("10.0.0.1:50052");
        for code in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
        ] {
            let s = engine_status(target.error(&Status::new(code, "h2 protocol error")));
            assert_eq!(s.code(), Code::Unavailable, "{code:?}");
            assert_eq!(
                s.message(),
                "target-service unavailable: h2 protocol error (at 10.0.0.1:50052; the orchestrator reconnects when it is back, retry then)"
            );
        }
        let e = Side::draft("http://10.0.0.2:50051").unavailable("it ended the session");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(
            e.to_string(),
            "draft-service unavailable: it ended the session (at http://10.0.0.2:50051)"
        );
    }
}
