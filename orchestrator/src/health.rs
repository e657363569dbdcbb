//! The orchestrator's own health (`grpc.health.v1`): kept current from the
//! target's answers and the draft pool, NOT_SERVING once draining.

use std::time::Duration;

use duo_rpc::pb::generation_server::GenerationServer;
use tonic::Status;

use crate::service::Orchestrator;

/// Keeps the orchestrator's health current: `duo.v1.Generation` (and the
/// server as a whole) is SERVING while the target answers and matches our
/// tokenizer, NOT_SERVING while it is down — probed every `interval`, with
/// backoff up to 2 s while down (the channel reconnects by itself);
/// `duo.v1.Draft` is SERVING while at least one draft worker is healthy
/// (without one, generations still run, target-only). Once `draining`
/// turns true everything is NOT_SERVING for good.
pub(crate) async fn watch_health(
    svc: Orchestrator,
    reporter: tonic_health::server::HealthReporter,
    interval: Duration,
    draining: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let drained = duo_rpc::serve::stopped(&draining);
    tokio::pin!(drained);
    let mut up: Option<bool> = None;
    let mut drafts_up: Option<bool> = None;
    let mut delay = Duration::from_millis(100);
    loop {
        let probe = async {
            let info = svc.describe_target().await?;
            Ok::<_, Status>(svc.remember_limits(&info))
        };
        let res = tokio::select! {
            res = tokio::time::timeout(Duration::from_secs(5), probe) => {
                res.unwrap_or_else(|_| Err(Status::unavailable("health probe timed out")))
            }
            _ = &mut drained => return not_serving(&reporter).await,
        };
        let now_up = res.is_ok();
        if up != Some(now_up) {
            let status = if now_up {
                tracing::info!("target-service reachable: orchestrator serving");
                ServingStatus::Serving
            } else {
                let why = res
                    .as_ref()
                    .err()
                    .map(|s| s.message().to_string())
                    .unwrap_or_default();
                if res
                    .as_ref()
                    .is_err_and(|s| s.code() == tonic::Code::FailedPrecondition)
                {
                    tracing::error!("{why}");
                } else if up.is_some() {
                    tracing::warn!("target-service unreachable: not serving ({why})");
                }
                ServingStatus::NotServing
            };
            reporter
                .set_service_status(
                    <GenerationServer<Orchestrator> as tonic::server::NamedService>::NAME,
                    status,
                )
                .await;
            reporter.set_service_status("", status).await;
            metrics::gauge!("duo_orchestrator_target_up").set(f64::from(u8::from(now_up)));
            up = Some(now_up);
        }
        let d_up = svc.0.pool.healthy_count() > 0;
        if drafts_up != Some(d_up) {
            let status = if d_up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("duo.v1.Draft", status).await;
            drafts_up = Some(d_up);
        }
        let wait = if now_up {
            delay = Duration::from_millis(100);
            interval
        } else {
            let d = delay;
            delay = (delay * 2).min(Duration::from_secs(2));
            d
        };
        tokio::select! {
            _ = &mut drained => return not_serving(&reporter).await,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Every service of the orchestrator NOT_SERVING (draining).
async fn not_serving(reporter: &tonic_health::server::HealthReporter) {
    let name = <GenerationServer<Orchestrator> as tonic::server::NamedService>::NAME;
    for service in [name, "", "duo.v1.Draft"] {
        reporter
            .set_service_status(service, tonic_health::ServingStatus::NotServing)
            .await;
    }
}
