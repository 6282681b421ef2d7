//! The standard gRPC health service (`grpc.health.v1`, tonic-health) on
//! `--grpc-listen`, for the load balancers and probes that speak it
//! (`grpc_health_probe`, Kubernetes' gRPC probes). The server (service `""`)
//! is SERVING while the controller is ready (as `/readyz`: after the first
//! observation of the nodes), NOT_SERVING before, and NOT_SERVING from the
//! moment it starts to shut down until it has stopped. Unauthenticated and
//! read-only. The same listener serves the nodes' `Lease.Renew`
//! ([`crate::lease`]), which is signed by each node's key.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::Shared;

/// How often readiness is copied into the health status.
const FOLLOW: Duration = Duration::from_millis(200);

/// The running health service.
#[derive(Debug)]
pub(crate) struct Health {
    reporter: HealthReporter,
    follow: tokio::task::JoinHandle<()>,
    /// Watches the nodes' leases for failures ([`crate::lease::watch_failures`]).
    failures: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    /// Where it listens.
    pub(crate) address: SocketAddr,
}

impl Health {
    /// Serves on `listener`, following `shared.ready`.
    pub(crate) async fn serve(
        listener: tokio::net::TcpListener,
        shared: Arc<Shared>,
    ) -> anyhow::Result<Health> {
        let address = listener.local_addr()?;
        let leases = Arc::clone(&shared.leases);
        let shared_for_leases = Arc::clone(&shared);
        let failures = tokio::spawn(crate::lease::watch_failures(Arc::clone(&shared)));
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        let follow = {
            let reporter = reporter.clone();
            tokio::spawn(async move {
                let mut was = None;
                loop {
                    let ready = shared.ready.load(Ordering::SeqCst);
                    if was != Some(ready) {
                        let status = if ready {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        reporter.set_service_status("", status).await;
                        was = Some(ready);
                    }
                    tokio::time::sleep(FOLLOW).await;
                }
            })
        };
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let server = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                // Lease.Renew and Enroll are verified against the bytes received.
                .layer(proto::received::HashBodiesLayer)
                .add_service(service)
                .add_service(proto::v1::lease_server::LeaseServer::new(
                    crate::lease::LeaseService::new(shared_for_leases.clone(), leases),
                ))
                .add_service(proto::v1::enrollment_server::EnrollmentServer::new(
                    crate::enroll::EnrollmentService::new(shared_for_leases),
                ))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stopped.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                eprintln!("warning: the gRPC health service on {address} stopped: {e}");
            }
        });
        Ok(Health {
            reporter,
            follow,
            failures,
            server,
            stop,
            address,
        })
    }

    /// NOT_SERVING from now on (the controller is shutting down).
    pub(crate) async fn not_serving(&self) {
        self.follow.abort();
        self.failures.abort();
        while !self.follow.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }

    /// Stops serving.
    pub(crate) async fn end(self) {
        self.not_serving().await;
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(5), self.server)
            .await
            .is_err()
        {
            eprintln!("note: the gRPC health service did not stop within 5 s");
        }
    }
}
