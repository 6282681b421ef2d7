//! Bonds: the node's bonded NICs with HTB QoS, carried out by the `network` crate.

use std::sync::Arc;

use proto::v1::{self, BondStatus};
use tonic::Status;

use crate::events::EventBus;
use crate::store::Store;
use crate::validate;

/// Every bond of the node.
#[derive(Debug)]
pub struct Bonds {
    node_name: String,
    store: Arc<Store>,
    events: Arc<EventBus>,
}

impl Bonds {
    /// Loads bond definitions.
    pub fn open(
        node_name: &str,
        store: Arc<Store>,
        events: Arc<EventBus>,
    ) -> Result<Self, crate::store::StoreError> {
        Ok(Self {
            node_name: node_name.to_string(),
            store,
            events,
        })
    }

    /// Creates or updates a bond.
    pub async fn apply(&self, bond: &v1::ApplyBond) -> Result<v1::BondResult, Status> {
        validate_bond(bond)?;
        let _ = (&self.store, &self.events);
        Err(Status::failed_precondition(format!(
            "node {}: bonds are not available in this build: the `network` crate is not integrated into cairn-node yet",
            self.node_name
        )))
    }

    /// Removes a bond (missing is fine).
    pub async fn delete(&self, name: &str) -> Result<(), Status> {
        validate_bond_name("delete_bond.name", name)?;
        Err(Status::failed_precondition(format!(
            "node {}: bonds are not available in this build: the `network` crate is not integrated into cairn-node yet",
            self.node_name
        )))
    }

    /// Status of every bond.
    pub async fn statuses(&self) -> Vec<BondStatus> {
        Vec::new()
    }
}

fn validate_bond_name(field: &str, name: &str) -> Result<(), Status> {
    validate::name(field, name)?;
    if name.len() > 15 {
        return Err(validate::invalid(
            field,
            format!("`{name}` is longer than 15 characters (a Linux device name)"),
        ));
    }
    Ok(())
}

/// Checks an `ApplyBond` request.
pub fn validate_bond(bond: &v1::ApplyBond) -> Result<(), Status> {
    validate_bond_name("apply_bond.name", &bond.name)?;
    if !matches!(
        bond.mode.as_str(),
        "active-backup" | "balance-rr" | "balance-xor" | "802.3ad"
    ) {
        return Err(validate::invalid(
            "apply_bond.mode",
            format!(
                "`{}` is not one of active-backup, balance-rr, balance-xor, 802.3ad",
                bond.mode
            ),
        ));
    }
    if bond.members.is_empty() {
        return Err(validate::invalid(
            "apply_bond.members",
            "must name at least one NIC",
        ));
    }
    if bond.mtu != 0 && !(68..=65535).contains(&bond.mtu) {
        return Err(validate::invalid(
            "apply_bond.mtu",
            format!("{} is out of range 68..=65535", bond.mtu),
        ));
    }
    for (index, class) in bond.traffic.iter().enumerate() {
        if !matches!(
            class.name.as_str(),
            "storage" | "migration" | "guest" | "management" | "replication"
        ) {
            return Err(validate::invalid(
                &format!("apply_bond.traffic[{index}].name"),
                format!(
                    "`{}` is not one of storage, migration, guest, management, replication",
                    class.name
                ),
            ));
        }
        if class.weight == 0 || class.weight > 100 {
            return Err(validate::invalid(
                &format!("apply_bond.traffic[{index}].weight"),
                format!("{} is out of range 1..=100", class.weight),
            ));
        }
        if class.max_bps != 0 && class.max_bps < class.min_bps {
            return Err(validate::invalid(
                &format!("apply_bond.traffic[{index}].max_bps"),
                format!("{} is below min_bps {}", class.max_bps, class.min_bps),
            ));
        }
    }
    Ok(())
}
