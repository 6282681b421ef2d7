//! Copies rebuilt after the loss of a node (issue 15 item 7), in a dev cluster under
//! the GitOps controller: the node holding `db-data`'s replica is killed for good; after
//! the rebuild delay (60 s) the controller makes a new copy on the third node through
//! the writer, which ships it the whole volume; the copy joins the in-sync set, and only
//! then is the lost copy dropped.

use std::time::Duration;

use crate::ha::HaCluster;

/// The controller log's lines about `volume db-data`.
fn db_data_lines(ha: &HaCluster) -> Vec<String> {
    std::fs::read_to_string(ha.cluster.path().join(".cairn/dev/controller.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("volume db-data"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_lost_nodes_copy_is_rebuilt_on_another_node_before_it_is_dropped() {
    // The web group without `spread "node"` (two nodes are left).
    let Some(ha) = HaCluster::up_in(
        "rebuild-lost",
        |dir| {
            let path = dir.join("workloads.kdl");
            let text = std::fs::read_to_string(&path).expect("read workloads.kdl");
            let text: String = text
                .lines()
                .filter(|l| !l.contains("spread \"node\""))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&path, text).expect("write workloads.kdl");
        },
        None,
    ) else {
        return;
    };
    let adopted = ha.wait("db-data's epoch adopted", Duration::from_secs(60), |_| {
        db_data_lines(&ha)
            .into_iter()
            .find(|l| l.contains("volume-epoch") && l.contains("in sync: "))
    });
    // "epoch 1: writer lab-1, in sync: lab-1, lab-2"
    let after = |line: &str, key: &str| -> String {
        let at = line
            .find(key)
            .unwrap_or_else(|| panic!("`{key}` in {line}"))
            + key.len();
        line[at..].to_owned()
    };
    let writer: String = after(&adopted, "writer ")
        .chars()
        .take_while(|c| *c != ',')
        .collect();
    let in_sync: Vec<String> = after(&adopted, "in sync: ")
        .split([',', ';', '"'])
        .take(2)
        .map(|n| n.trim().to_owned())
        .collect();
    let lost = in_sync
        .iter()
        .find(|n| **n != writer)
        .unwrap_or_else(|| panic!("a replica in {adopted}"))
        .clone();
    let third = ["lab-1", "lab-2", "lab-3"]
        .into_iter()
        .find(|n| *n != writer && *n != lost)
        .expect("a third node")
        .to_owned();
    eprintln!("db-data: writer {writer}, replica {lost}; killing {lost} for good");
    let killed = ha.kill_node(&lost);
    let dropped = ha.wait(
        "the lost copy rebuilt and dropped",
        Duration::from_secs(240),
        |_| {
            db_data_lines(&ha)
                .into_iter()
                .position(|l| l.contains(&format!("the lost copy on {lost} is forgotten")))
                .map(|at| (at, killed.elapsed()))
        },
    );
    let lines = db_data_lines(&ha);
    for line in &lines {
        eprintln!("  {}", line.chars().take(240).collect::<String>());
    }
    let position = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no `{needle}` in the controller log:\n{}", lines.join("\n")))
    };
    let new_copy = position(&format!("new copy on {third}"));
    let joined = position(&format!("added copy {third}"));
    assert!(
        new_copy < joined && joined < dropped.0,
        "new copy, then in sync, then the lost one dropped"
    );
    // Not before the rebuild delay.
    let rebuilding = position("volume-copy");
    assert!(rebuilding <= new_copy, "{}", lines[rebuilding]);
    eprintln!(
        "{lost} killed → copy rebuilt on {third}, in sync, {lost}'s dropped after {:?}",
        dropped.1
    );
    assert!(dropped.1 >= Duration::from_secs(60), "{:?}", dropped.1);
    let final_epoch = lines
        .iter()
        .rev()
        .find(|l| l.contains("volume-epoch") && l.contains("in sync: "))
        .expect("an epoch line");
    assert!(
        final_epoch.contains(&format!("in sync: {}", {
            let mut both = [writer.clone(), third.clone()];
            both.sort();
            both.join(", ")
        })),
        "{final_epoch}"
    );
}
