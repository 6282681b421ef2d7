//! The rules, one case each, on compiled specs (the quickstart's cluster with
//! two tenants whose members carry keys).

use std::collections::BTreeMap;

use super::*;
use crate::sshsig::AllowedSigners;

/// A distinct, well-formed key per seed (any 32 bytes are a key blob here:
/// the authorization compares blobs; signatures are checked elsewhere).
fn key(seed: u8) -> (Vec<u8>, String) {
    let k = [seed; 32];
    let blob = compiler::sshkey::ed25519_blob(&k);
    let text = compiler::sshkey::PublicKey {
        blob: blob.clone(),
        key: k,
        comment: None,
    }
    .canonical();
    (blob, text)
}

const PLATFORM: u8 = 1;
const DEV_ADMIN: u8 = 2;
const DEV_OPERATOR: u8 = 3;
const DEV_VIEWER: u8 = 4;
const OPS_OPERATOR: u8 = 5;
const STRANGER: u8 = 6;

fn cluster() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/quickstart/cluster.kdl"
    ))
    .expect("the quickstart cluster")
}

fn tenants(extra_member: &str, dev_quota_vms: u32) -> String {
    format!(
        r#"
tenant "dev" {{
    quota vcpus=8 memory="1GiB" storage="2GiB" vms={dev_quota_vms}
    member "admin@example.com" role="admin" key="{}"
    member "op@example.com" role="operator" key="{}"
    member "viewer@example.com" role="viewer" key="{}"
    {extra_member}
    network "dev-net" site="lab" cidr="10.77.0.0/24" gateway="10.77.0.1"
}}
tenant "ops" {{
    quota vcpus=4 memory="512MiB" storage="1GiB" vms=4
    member "ops@example.com" role="operator" key="{}"
    network "ops-net" site="lab" cidr="10.78.0.0/24" gateway="10.78.0.1"
}}
image "tiny" builtin="cairn-guest"
"#,
        key(DEV_ADMIN).1,
        key(DEV_OPERATOR).1,
        key(DEV_VIEWER).1,
        key(OPS_OPERATOR).1
    )
}

fn workloads(db_memory: &str, backup: bool) -> String {
    let mut w = format!(
        r#"
vm "db" tenant="dev" site="lab" {{
    cpu 1
    memory "{db_memory}"
    image "tiny"
    nic network="dev-net"
    tag "app" "db"
}}
"#
    );
    if backup {
        w.push_str(
            r#"
vm "backup" tenant="ops" site="lab" {
    cpu 1
    memory "64MiB"
    sla "spot"
    image "tiny"
    nic network="ops-net"
}
"#,
        );
    }
    w
}

struct Commit {
    sources: compiler::Sources,
    compilation: compiler::Compilation,
    files: BTreeMap<String, String>,
}

fn commit(files: &[(&str, String)]) -> Commit {
    let sources = compiler::Sources::from_files(
        files
            .iter()
            .filter(|(p, _)| p.ends_with(".kdl"))
            .map(|(p, t)| ((*p).to_owned(), t.clone())),
    );
    let compilation = compiler::compile(&sources);
    let errors: Vec<_> = compilation
        .diagnostics
        .iter()
        .filter(|d| d.is_error())
        .map(|d| d.message.clone())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    let files = files
        .iter()
        .filter(|(p, _)| !p.ends_with(".kdl"))
        .map(|(p, t)| ((*p).to_owned(), t.clone()))
        .collect();
    Commit {
        sources,
        compilation,
        files,
    }
}

fn base() -> Commit {
    commit(&[
        ("cluster.kdl", cluster()),
        ("tenants.kdl", tenants("", 8)),
        ("workloads.kdl", workloads("128MiB", true)),
        ("policies/budget.rego", "package budget".to_owned()),
    ])
}

fn platform() -> AllowedSigners {
    AllowedSigners::parse(&format!("root@example.com {}\n", key(PLATFORM).1)).expect("parses")
}

/// Judges base → `next` signed by `seed`, with the base as the authority.
fn judge(seed: u8, next: &Commit) -> Verdict {
    judge_from(&base(), seed, next)
}

fn judge_from(from: &Commit, seed: u8, next: &Commit) -> Verdict {
    let authority = &from.compilation.model;
    let signer = identify(&key(seed).0, &platform(), Some(authority));
    let locate = locator(&next.sources, &next.compilation.spans);
    authorize(
        Some(authority),
        &signer,
        &Snapshot::new(authority, from.files.clone()),
        &Snapshot::new(&next.compilation.model, next.files.clone()),
        &locate,
    )
}

fn with_workloads(w: String) -> Commit {
    commit(&[
        ("cluster.kdl", cluster()),
        ("tenants.kdl", tenants("", 8)),
        ("workloads.kdl", w),
        ("policies/budget.rego", "package budget".to_owned()),
    ])
}

#[test]
fn keys_are_identified_from_the_authority_only() {
    let b = base();
    let m = &b.compilation.model;
    assert!(matches!(
        identify(&key(PLATFORM).0, &platform(), Some(m)),
        Signer::Platform { .. }
    ));
    match identify(&key(DEV_OPERATOR).0, &platform(), Some(m)) {
        Signer::Member { memberships, .. } => {
            assert_eq!(memberships.len(), 1);
            assert_eq!(memberships[0].tenant, "dev");
            assert_eq!(memberships[0].role, "operator");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        identify(&key(STRANGER).0, &platform(), Some(m)),
        Signer::Unknown { .. }
    ));
    // Nothing applied yet: only platform keys are anyone.
    assert!(matches!(
        identify(&key(DEV_OPERATOR).0, &platform(), None),
        Signer::Unknown { .. }
    ));
}

#[test]
fn an_operator_may_change_its_own_tenants_vm() {
    let next = with_workloads(workloads("256MiB", true));
    let v = judge(DEV_OPERATOR, &next);
    assert!(v.allowed(), "{:?}", v.refusals);
    assert_eq!(v.changed, vec!["vm db".to_owned()]);
    // The admin too.
    assert!(judge(DEV_ADMIN, &next).allowed());
}

#[test]
fn a_viewer_is_refused_naming_the_object_its_place_and_who_may() {
    let next = with_workloads(workloads("256MiB", true));
    let v = judge(DEV_VIEWER, &next);
    assert!(!v.allowed());
    assert_eq!(v.refusals.len(), 1);
    let r = &v.refusals[0];
    assert_eq!((r.kind.as_str(), r.name.as_str()), ("vm", "db"));
    assert_eq!(r.action, Action::Changed);
    assert_eq!(r.location.as_deref(), Some("workloads.kdl:2:4"));
    assert!(
        r.rule
            .contains("viewer@example.com is a viewer of tenant dev"),
        "{}",
        r.rule
    );
    assert!(
        r.may_change
            .contains("admin@example.com (admin), op@example.com (operator)"),
        "{}",
        r.may_change
    );
    let line = r.line();
    assert!(
        line.starts_with("vm db (workloads.kdl:2:4) changed: "),
        "{line}"
    );
}

#[test]
fn an_operator_of_one_tenant_is_refused_another_tenants_vm() {
    // ops's operator edits dev's VM.
    let next = with_workloads(workloads("256MiB", true));
    let v = judge(OPS_OPERATOR, &next);
    assert_eq!(v.refusals.len(), 1, "{:?}", v.refusals);
    assert!(v.refusals[0].rule.contains("not a member of tenant dev"));
    // And may still delete its own VM…
    let own = with_workloads(workloads("128MiB", false));
    assert!(judge(OPS_OPERATOR, &own).allowed());
    // …which dev's operator may not: a deletion is a change.
    let v = judge(DEV_OPERATOR, &own);
    assert_eq!(v.refusals.len(), 1);
    assert_eq!(v.refusals[0].action, Action::Removed);
    assert_eq!(v.refusals[0].name, "backup");
    assert_eq!(v.refusals[0].location, None);
}

#[test]
fn moving_a_vm_to_another_tenant_needs_both_tenants() {
    let moved = with_workloads(
        workloads("128MiB", true)
            .replace(r#"vm "db" tenant="dev""#, r#"vm "db" tenant="ops""#)
            .replace(r#"nic network="dev-net""#, r#"nic network="ops-net""#),
    );
    assert!(!judge(DEV_OPERATOR, &moved).allowed());
    assert!(!judge(OPS_OPERATOR, &moved).allowed());
    assert!(judge(PLATFORM, &moved).allowed());
}

#[test]
fn a_tenant_admin_is_refused_the_quota_and_the_members() {
    let quota = commit(&[
        ("cluster.kdl", cluster()),
        ("tenants.kdl", tenants("", 16)),
        ("workloads.kdl", workloads("128MiB", true)),
        ("policies/budget.rego", "package budget".to_owned()),
    ]);
    let v = judge(DEV_ADMIN, &quota);
    assert_eq!(v.refusals.len(), 1, "{:?}", v.refusals);
    let r = &v.refusals[0];
    assert_eq!((r.kind.as_str(), r.name.as_str()), ("quota", "dev"));
    assert_eq!(r.location.as_deref(), Some("tenants.kdl:2:8"));
    assert!(
        r.rule.contains("a tenant's quota is platform-only"),
        "{}",
        r.rule
    );
    assert!(r.may_change.contains("only by a platform key"));
    assert!(judge(PLATFORM, &quota).allowed());
}

#[test]
fn a_member_adding_themselves_or_raising_their_role_is_refused() {
    // The viewer promotes itself; a stranger adds its own key.
    let promoted = commit(&[
        ("cluster.kdl", cluster()),
        (
            "tenants.kdl",
            tenants("", 8).replace(
                r#"member "viewer@example.com" role="viewer""#,
                r#"member "viewer@example.com" role="operator""#,
            ),
        ),
        ("workloads.kdl", workloads("128MiB", true)),
        ("policies/budget.rego", "package budget".to_owned()),
    ]);
    let v = judge(DEV_VIEWER, &promoted);
    assert_eq!(v.refusals.len(), 1);
    assert_eq!(v.refusals[0].kind, "member");
    assert_eq!(v.refusals[0].name, "dev/viewer@example.com");
    let added = commit(&[
        ("cluster.kdl", cluster()),
        (
            "tenants.kdl",
            tenants(
                &format!(
                    r#"member "new@example.com" role="admin" key="{}""#,
                    key(STRANGER).1
                ),
                8,
            ),
        ),
        ("workloads.kdl", workloads("256MiB", true)),
        ("policies/budget.rego", "package budget".to_owned()),
    ]);
    // The dev admin adds a member and changes a VM: the member is refused.
    let v = judge(DEV_ADMIN, &added);
    assert_eq!(v.refusals.len(), 1, "{:?}", v.refusals);
    assert_eq!(v.refusals[0].action, Action::Added);
    assert_eq!(v.refusals[0].name, "dev/new@example.com");
    // Once that commit is applied (by a platform key) the new key counts,
    // and not before: judged against the base, the stranger is unknown.
    let v = judge(STRANGER, &with_workloads(workloads("256MiB", true)));
    assert!(matches!(v.signer, Signer::Unknown { .. }));
    assert!(!v.allowed());
    let v = judge_from(&added, STRANGER, &{
        let mut w = workloads("512MiB", true);
        w.push('\n');
        commit(&[
            ("cluster.kdl", cluster()),
            ("tenants.kdl", added_tenants()),
            ("workloads.kdl", w),
            ("policies/budget.rego", "package budget".to_owned()),
        ])
    });
    assert!(v.allowed(), "{:?}", v.refusals);
}

fn added_tenants() -> String {
    tenants(
        &format!(
            r#"member "new@example.com" role="admin" key="{}""#,
            key(STRANGER).1
        ),
        8,
    )
}

#[test]
fn platform_objects_and_files_are_refused_to_members_and_allowed_to_platform_keys() {
    let changed = commit(&[
        (
            "cluster.kdl",
            cluster().replace("stripe-unit \"64KiB\"", "stripe-unit \"128KiB\""),
        ),
        ("tenants.kdl", tenants("", 8)),
        ("workloads.kdl", workloads("128MiB", true)),
        (
            "policies/budget.rego",
            "package budget\n# looser".to_owned(),
        ),
        ("README.md", "not judged".to_owned()),
    ]);
    let v = judge(DEV_ADMIN, &changed);
    let names: Vec<(&str, &str)> = v
        .refusals
        .iter()
        .map(|r| (r.kind.as_str(), r.name.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("policy-file", "policies/budget.rego"),
            ("pool", "lab/local")
        ]
    );
    let v = judge(PLATFORM, &changed);
    assert!(v.allowed());
    assert_eq!(v.changed.len(), 2);
    assert!(matches!(v.signer, Signer::Platform { .. }));
}

#[test]
fn unknown_top_level_kinds_are_platform_only() {
    let b = base();
    let mut after = Snapshot::new(&b.compilation.model, b.files.clone());
    after.model.as_object_mut().expect("object").insert(
        "reconcile_like_future_kind".into(),
        serde_json::json!({"auto_apply": false}),
    );
    let authority = &b.compilation.model;
    let signer = identify(&key(DEV_ADMIN).0, &platform(), Some(authority));
    let v = authorize(
        Some(authority),
        &signer,
        &Snapshot::new(authority, b.files.clone()),
        &after,
        &nowhere,
    );
    assert_eq!(v.refusals.len(), 1);
    assert_eq!(v.refusals[0].kind, "reconcile-like-future-kind");
    assert!(v.refusals[0].may_change.contains("only by a platform key"));
}

#[test]
fn reformatting_and_moving_objects_between_files_is_not_a_change() {
    let b = base();
    let w = workloads("128MiB", true);
    let (db, backup) = w.split_at(w.find(r#"vm "backup""#).expect("backup"));
    let moved = commit(&[
        ("cluster.kdl", format!("// a comment\n{}", cluster())),
        ("tenants.kdl", tenants("", 8).replace("    ", "  ")),
        (
            "a-db.kdl",
            db.replace(r#"memory "128MiB""#, r#"memory "0.125GiB""#),
        ),
        ("z-backup.kdl", backup.to_owned()),
        ("policies/budget.rego", "package budget".to_owned()),
    ]);
    let v = judge_from(&b, DEV_VIEWER, &moved);
    assert!(v.allowed(), "{:?}", v.refusals);
    assert!(v.changed.is_empty(), "{:?}", v.changed);
}

#[test]
fn adding_a_vm_is_not_a_change_to_the_tenant_or_to_affinities() {
    // usage and an affinity's matched VMs are derived: a new VM changes
    // neither as far as authorization goes.
    let mut w = workloads("128MiB", true);
    w.push_str("affinity \"db-apart\" kind=\"apart\" scope=\"node\" {\n    select app=\"db\"\n}\n");
    let before = with_workloads(w.clone());
    w.push_str("vm \"db-2\" tenant=\"dev\" site=\"lab\" {\n    cpu 1\n    memory \"64MiB\"\n    image \"tiny\"\n    tag \"app\" \"db\"\n}\n");
    let after = with_workloads(w);
    let v = judge_from(&before, DEV_OPERATOR, &after);
    assert!(v.allowed(), "{:?}", v.refusals);
    assert_eq!(v.changed, vec!["vm db-2".to_owned()]);
}

#[test]
fn an_affinity_of_one_tenant_is_its_own_and_across_tenants_is_platform_only() {
    let own = with_workloads(format!(
        "{}affinity \"db-apart\" kind=\"apart\" scope=\"node\" {{\n    select app=\"db\"\n}}\n",
        workloads("128MiB", true)
    ));
    assert!(judge(DEV_OPERATOR, &own).allowed());
    let across = with_workloads(format!(
        "{}affinity \"all-apart\" kind=\"apart\" scope=\"node\" {{\n    select site=\"lab\"\n}}\n",
        workloads("128MiB", true)
    ));
    let v = judge(DEV_OPERATOR, &across);
    assert_eq!(v.refusals.len(), 1);
    assert_eq!(v.refusals[0].kind, "affinity");
    assert!(v.refusals[0].rule.contains("an affinity across tenants"));
}

#[test]
fn a_merge_is_judged_on_what_differs_from_every_parent() {
    // Parent 1: base. Parent 2: dev's operator changed db (judged on its own).
    // The merge takes parent 2's db: not the merger's change. A merge that
    // also changes the quota made that change itself.
    let b = base();
    let side = with_workloads(workloads("256MiB", true));
    let authority = &b.compilation.model;
    let signer = identify(&key(OPS_OPERATOR).0, &platform(), Some(authority));
    let p = [
        Snapshot::new(authority, b.files.clone()),
        Snapshot::new(&side.compilation.model, side.files.clone()),
    ];
    let clean = Snapshot::new(&side.compilation.model, side.files.clone());
    let v = authorize_merge(Some(authority), &signer, &p, &clean, &nowhere);
    assert!(v.allowed(), "{:?}", v.refusals);
    let evil = commit(&[
        ("cluster.kdl", cluster()),
        ("tenants.kdl", tenants("", 99)),
        ("workloads.kdl", workloads("256MiB", true)),
        ("policies/budget.rego", "package budget".to_owned()),
    ]);
    let evil = Snapshot::new(&evil.compilation.model, evil.files.clone());
    let v = authorize_merge(Some(authority), &signer, &p, &evil, &nowhere);
    assert_eq!(v.refusals.len(), 1, "{:?}", v.refusals);
    assert_eq!(v.refusals[0].kind, "quota");
}

#[test]
fn with_nothing_applied_only_platform_keys_may_change_anything() {
    let next = base();
    let empty = Snapshot::default();
    let after = Snapshot::new(&next.compilation.model, next.files.clone());
    let member = identify(&key(DEV_ADMIN).0, &platform(), None);
    let v = authorize(None, &member, &empty, &after, &nowhere);
    assert!(!v.allowed());
    assert!(v.refusals.iter().any(|r| r.kind == "vm" && r.name == "db"));
    let root = identify(&key(PLATFORM).0, &platform(), None);
    assert!(authorize(None, &root, &empty, &after, &nowhere).allowed());
}
