//! The standard gRPC health service (grpc.health.v1), as probes and load
//! balancers ask it (node on 127.0.0.94).

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::controller;
use crate::lab::start_at_ip;

#[tokio::test(flavor = "multi_thread")]
async fn a_node_answers_the_grpc_health_service_for_itself_and_each_service() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_at_ip("health-1", dir.path(), &controller(), "127.0.0.94");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.address))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    for service in [
        "",
        "cairn.node.v1.Inventory",
        "cairn.node.v1.Observe",
        "cairn.node.v1.Apply",
        "cairn.node.v1.Watch",
        "cairn.node.v1.Replication",
    ] {
        let answer = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of `{service}`: {e}"))
            .into_inner();
        assert_eq!(answer.status(), ServingStatus::Serving, "`{service}`");
    }
    let unknown = client
        .check(HealthCheckRequest {
            service: "cairn.node.v1.Nothing".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown}");
}
