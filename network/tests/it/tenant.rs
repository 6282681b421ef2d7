//! Tenant bridges and VM taps.

use network::tenant::{
    ensure_tenant_bridge, ensure_vm_tap, observe_tenant_network, remove_vm_tap, tenant_bridge_name,
    vm_tap_name,
};

use crate::common::{Topology, require_netns};

#[test]
fn taps_attach_to_tenant_bridges_idempotently() {
    require_netns!();
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping: /dev/net/tun is missing");
        return;
    }
    let topo = Topology::new();
    let ns = topo.node_ns();
    let first = ensure_tenant_bridge(&ns, "finance", "fin-app", 1500).expect("bridge");
    assert!(!first.is_empty());
    assert!(
        ensure_tenant_bridge(&ns, "finance", "fin-app", 1500)
            .expect("bridge again")
            .is_empty()
    );
    let bridge = tenant_bridge_name("finance", "fin-app");
    let (tap0, a0) = ensure_vm_tap(&ns, "fin-db-1", 0, &bridge, 1500).expect("tap 0");
    let (tap1, _) = ensure_vm_tap(&ns, "fin-db-1", 1, &bridge, 1500).expect("tap 1");
    assert!(!a0.is_empty());
    assert_eq!(tap0, vm_tap_name("fin-db-1", 0));
    let (_, again) = ensure_vm_tap(&ns, "fin-db-1", 0, &bridge, 1500).expect("tap again");
    assert!(again.is_empty(), "{again:?}");
    let obs = observe_tenant_network(&ns, "finance", "fin-app").expect("observe");
    assert!(obs.exists && obs.up);
    let mut want = vec![tap0.clone(), tap1.clone()];
    want.sort();
    assert_eq!(obs.ports, want);
    remove_vm_tap(&ns, "fin-db-1", 1).expect("remove");
    assert_eq!(
        observe_tenant_network(&ns, "finance", "fin-app")
            .expect("observe")
            .ports,
        vec![tap0]
    );
}
